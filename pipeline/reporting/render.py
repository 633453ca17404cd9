"""Reports rendered: markdown (`render_markdown`) and a self-contained HTML page (`render_html`).

The HTML opens from disk with no server: CSS inline, images inline as data
URIs, no scripts and no references outside the page.
"""
from __future__ import annotations

import base64
import datetime
import html

from pipeline.reporting.document import Code, Details, Document, Image, Para, Row, Table

# Markdown.

def _md_inline(part, *, cell: bool = False) -> str:
    if isinstance(part, str):
        text = part
    elif part[0] == "code":
        text = f"`{part[1]}`"
    elif part[0] == "b":
        text = f"**{part[1]}**"
    elif part[0] == "link":
        text = f"[{part[1]}]({part[2]})"
    else:
        raise ValueError(f"unknown inline {part!r}")
    return text.replace("|", "\\|").replace("\n", " ") if cell else text


def _md_parts(parts) -> str:
    return "".join(_md_inline(p) for p in parts)


def _md_block(block) -> list[str]:
    if isinstance(block, Para):
        prefix = {"note": "> ", "warn": "> **Note:** "}.get(block.kind, "")
        return [prefix + _md_parts(block.parts), ""]
    if isinstance(block, Code):
        return ["```", block.text, "```", ""]
    if isinstance(block, Table):
        lines = [f"*{block.caption}*", ""] if block.caption else []
        cells = [[_md_inline(c, cell=True) for c in row] for row in block.rows]
        for i in block.highlight:
            if i < len(cells):
                cells[i] = [f"**{c}**" if c and c != "–" else c for c in cells[i]]
        align = block.align or "l" * len(block.headers)
        lines.append("| " + " | ".join(h or " " for h in block.headers) + " |")
        lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return lines + [""]
    if isinstance(block, Image):
        return [f"![{block.alt}]({block.href})", ""]
    if isinstance(block, Details):
        return [_md_parts(block.markdown_note), ""] if block.markdown_note else []
    if isinstance(block, Row):
        return [line for b in block.blocks for line in _md_block(b)]
    raise TypeError(f"unknown block {block!r}")


def render_markdown(doc: Document) -> str:
    lines = [f"# {doc.title}", "", f"*{doc.subtitle}*", ""]
    lines += [f"- **{label}:** {value}" + (f" ({detail})" if detail else "")
              for label, value, detail in doc.facts.items]
    lines.append("")
    for block in doc.lead:
        lines += _md_block(block)
    for section in doc.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            lines += _md_block(block)
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines += ["---", f"*Written by `python -m pipeline.report` on {generated}.*", ""]
    return "\n".join(lines)


# HTML.

_CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #d9e2ec; --soft: #f5f7fa; --accent: #2f6fbd;
        --ok: #1f7a4d; --bad: #b3261e; --warn: #8a5a00; }
* { box-sizing: border-box; }
body { margin: 0; background: #eef2f6; color: var(--ink);
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 24px auto; padding: 28px 36px 20px; background: #fff;
       border: 1px solid var(--line); border-radius: 10px; }
header { border-bottom: 2px solid var(--line); padding-bottom: 12px; margin-bottom: 18px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h1 .badge { vertical-align: middle; margin-left: 10px; }
.subtitle { color: var(--muted); margin: 0; word-break: break-all; }
h2 { font-size: 19px; margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.badge { display: inline-block; font-size: 12px; font-weight: 600; letter-spacing: .04em;
         text-transform: uppercase; padding: 3px 9px; border-radius: 999px; color: #fff;
         background: var(--muted); }
.badge.completed { background: var(--ok); } .badge.diverged { background: var(--bad); }
.badge.interrupted { background: var(--warn); } .badge.running { background: var(--accent); }
.badge.compare { background: var(--accent); }
.facts { display: grid; grid-template-columns: repeat(auto-fit, minmax(180px, 1fr)); gap: 12px;
         margin: 16px 0 6px; }
.fact { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.fact .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .05em; }
.fact .value { font-size: 22px; font-weight: 650; margin: 2px 0; }
.fact .detail { color: var(--muted); font-size: 12.5px; word-break: break-word; }
p { margin: 8px 0; }
p.note { color: var(--muted); font-size: 13.5px; }
p.nav { font-size: 13.5px; margin-top: 10px; }
p.warn { background: #fff6e0; border-left: 4px solid #e0a100; padding: 8px 12px; border-radius: 4px; }
code { font-family: "SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace; font-size: 13px;
       background: var(--soft); padding: 1px 5px; border-radius: 4px; }
pre { background: #1f2933; color: #e4e7eb; padding: 12px 16px; border-radius: 8px; overflow-x: auto; }
pre code { background: none; color: inherit; padding: 0; font-size: 13.5px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13.5px; }
caption { caption-side: top; text-align: left; font-weight: 600; color: var(--muted); padding: 4px 0; }
th, td { padding: 4px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; white-space: nowrap; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) td { background: #fafbfc; }
tr.hl td { background: #e3effd; font-weight: 600; }
.scroll { max-height: 460px; overflow: auto; border: 1px solid var(--line); border-radius: 6px;
          display: inline-block; }
.scroll table { margin: 0; }
.row { display: flex; flex-wrap: wrap; gap: 0 28px; align-items: flex-start; }
.row > div { flex: 0 1 auto; min-width: 0; } .row > div:last-child { flex: 1 1 420px; }
.tables { display: flex; flex-wrap: wrap; gap: 0 28px; align-items: flex-start; }
figure { margin: 14px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; }
details { margin: 6px 0 12px; } summary { cursor: pointer; color: var(--accent); }
a { color: var(--accent); }
footer { color: var(--muted); font-size: 12.5px; margin-top: 30px; border-top: 1px solid var(--line);
         padding-top: 8px; }
"""


def _h(text) -> str:
    return html.escape(str(text), quote=True)


def _html_inline(part) -> str:
    if isinstance(part, str):
        return _h(part)
    if part[0] == "code":
        return f"<code>{_h(part[1])}</code>"
    if part[0] == "b":
        return f"<strong>{_h(part[1])}</strong>"
    if part[0] == "link":
        return f'<a href="{_h(part[2])}">{_h(part[1])}</a>'
    raise ValueError(f"unknown inline {part!r}")


def _data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _html_table(block: Table) -> str:
    align = block.align or "l" * len(block.headers)
    cls = lambda i: ' class="r"' if i < len(align) and align[i] == "r" else ""  # noqa: E731
    out = ["<table>"]
    if block.caption:
        out.append(f"<caption>{_h(block.caption)}</caption>")
    if any(block.headers):
        out.append("<thead><tr>" + "".join(f"<th{cls(i)}>{_h(h)}</th>" for i, h in enumerate(block.headers))
                   + "</tr></thead>")
    out.append("<tbody>")
    for r, row in enumerate(block.rows):
        tr = ' class="hl"' if r in block.highlight else ""
        out.append(f"<tr{tr}>" + "".join(f"<td{cls(i)}>{_html_inline(c)}</td>" for i, c in enumerate(row))
                   + "</tr>")
    out.append("</tbody></table>")
    table = "".join(out)
    return f'<div class="scroll">{table}</div>' if block.scroll else table


def _html_block(block) -> str:
    if isinstance(block, Para):
        cls = f' class="{block.kind}"' if block.kind else ""
        return f"<p{cls}>{''.join(_html_inline(p) for p in block.parts)}</p>"
    if isinstance(block, Code):
        return f"<pre><code>{_h(block.text)}</code></pre>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Image):
        return (f'<figure><img src="{_data_uri(block.path)}" alt="{_h(block.alt)}"/>'
                f"<figcaption>{_h(block.alt)} ({_h(block.href)})</figcaption></figure>")
    if isinstance(block, Details):
        return (f"<details><summary>{_h(block.summary)}</summary>"
                + "".join(_html_block(b) for b in block.blocks) + "</details>")
    if isinstance(block, Row):
        return '<div class="row">' + "".join(f"<div>{_html_block(b)}</div>" for b in block.blocks) + "</div>"
    raise TypeError(f"unknown block {block!r}")


def _html_blocks(blocks) -> str:
    out, tables = [], []

    def flush():
        if len(tables) > 1:
            out.append('<div class="tables">' + "".join(tables) + "</div>")
        else:
            out.extend(tables)
        tables.clear()

    for block in blocks:   # consecutive small tables sit side by side
        if isinstance(block, Table) and not block.scroll and len(block.rows) <= 40:
            tables.append(_html_table(block))
            continue
        flush()
        out.append(_html_block(block))
    flush()
    return "\n".join(out)


def render_html(doc: Document) -> str:
    """A self-contained page: inline CSS, images as data URIs, no external references."""
    facts = "".join(f'<div class="fact"><div class="label">{_h(label)}</div>'
                    f'<div class="value">{_h(value)}</div><div class="detail">{_h(detail)}</div></div>'
                    for label, value, detail in doc.facts.items)
    nav = " · ".join(f'<a href="#{_h(s.anchor)}">{_h(s.title)}</a>' for s in doc.sections)
    sections = "\n".join(f'<section id="{_h(s.anchor)}"><h2>{_h(s.title)}</h2>\n'
                         f"{_html_blocks(s.blocks)}</section>" for s in doc.sections)
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8"/>\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"/>\n'
            f"<title>{_h(doc.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            f'<header><h1>{_h(doc.title)}'
            f'<span class="badge {_h(doc.status_kind)}">{_h(doc.status)}</span></h1>\n'
            f'<p class="subtitle">{_h(doc.subtitle)}</p>\n<div class="facts">{facts}</div>\n'
            f'{_html_blocks(doc.lead)}\n<p class="nav">{nav}</p></header>\n{sections}\n'
            f"<footer>Written by <code>python -m pipeline.report</code> on {_h(generated)}.</footer>\n"
            "</main>\n</body>\n</html>\n")
