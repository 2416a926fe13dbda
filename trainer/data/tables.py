"""Samples held in tables: the Arrow files a Hugging Face `datasets` dataset keeps (its save_to_disk
folder, its cache), read row by row for the streaming dataset.

An image cell is what `datasets` stores for an Image feature, {"bytes", "path"} (bytes inline, or a
file beside it), or plain bytes, or a path. Only the rows a worker wants are turned into Python
objects; an Arrow file is memory-mapped, so skipping rows costs nothing. Files from elsewhere are
hostile until read: a damaged one is a one-line error naming it, never a crash.
"""

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from trainer.core.errors import UserError


def _record_batches(path: str) -> Iterator:
    """An Arrow file's record batches, memory-mapped: a batch's rows are read only when asked for."""
    import pyarrow as pa

    with pa.memory_map(path) as source:
        try:
            reader = pa.ipc.open_stream(source)  # what `datasets` writes
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
            return
        yield from reader


def count_rows(path: str) -> int:
    """An Arrow file's rows, from its batches' headers."""
    import pyarrow as pa

    try:
        return sum(batch.num_rows for batch in _record_batches(path))
    except (pa.ArrowException, OSError) as e:
        raise UserError(
            f"dataset.path: cannot read {path} as a table ({_first_line(e)}); write the dataset "
            f"again (save_to_disk)"
        ) from None


def iter_table_rows(
    path: str,
    columns: tuple[str, str],
    start: int,
    stop: int,
    wanted: Callable[[int], bool],
    classes: Sequence[str],
) -> Iterator[tuple[int, Callable[[], tuple[bytes, int]]]]:
    """(row, read) for the wanted rows with start <= row < stop, as shard_format.iter_shard gives them;
    `read()` returns (encoded image, label)."""
    import pyarrow as pa

    image_column, label_column = columns
    first = 0
    try:
        for batch in _record_batches(path):
            if first >= stop:
                return
            if first + batch.num_rows > start:
                images, labels = batch.column(image_column), batch.column(label_column)
                for row in range(max(start - first, 0), min(stop - first, batch.num_rows)):
                    if wanted(first + row):
                        yield (
                            first + row,
                            lambda row=row, images=images, labels=labels: (
                                image_bytes(images[row].as_py(), path),
                                label_index(labels[row].as_py(), classes),
                            ),
                        )
            first += batch.num_rows
    except (pa.ArrowException, KeyError) as e:  # a damaged file, or one without the configured columns
        raise UserError(
            f"dataset.path: cannot read rows of {path} ({_first_line(e)}); check the file and "
            f"dataset.image_column / dataset.label_column"
        ) from None


def image_bytes(cell: object, where: str) -> bytes:
    """An image cell's encoded bytes: {"bytes", "path"} (datasets' Image), bytes, or a file path."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        cell = cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, str) and cell:
        return Path(cell).read_bytes()  # OSError when it is not there: the sample counts as unreadable
    raise ValueError(f"a row of {where} holds no image ({type(cell).__name__})")


def label_index(value: object, classes: Sequence[str]) -> int:
    """A label cell as a class index: an index (datasets' ClassLabel) or a class name."""
    if isinstance(value, str):
        if value not in classes:
            raise ValueError(f"label {value!r} is not one of the {len(classes)} classes")
        return classes.index(value)
    if not isinstance(value, int) or not 0 <= value < len(classes):
        raise ValueError(f"label {value!r} is not a class index below {len(classes)}")
    return value


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:160]}" if text else type(error).__name__
