"""MkDocs hook: the configuration reference is generated when the site is built, from the config's
single source (trainer/config.py's schema and conf/<group>/*.yaml), so the page cannot drift."""

from trainer import reference

GENERATED = {
    "<!-- reference: framework -->": reference.framework_table,
    "<!-- reference: groups -->": reference.group_tables,
}


def on_page_markdown(markdown: str, **_: object) -> str:
    for marker, table in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, table())
    return markdown
