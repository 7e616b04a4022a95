"""The inspect job's HTML report: a dataset's manifest, rejections and a sample of its shards
in; one self-contained ``index.html`` out (every chart and image embedded as a base64 PNG,
no script, no network), viewable offline.

Sections: overview (splits, shards, bytes), a class-distribution bar chart per split, a
contact sheet per class (decoded examples with their label and file name), the rejected
inputs, and the image-size statistics.

Contact-sheet examples come from the first shards in manifest order (train first); reading
stops once every class has its samples or after ``MAX_SAMPLE_SHARDS`` shards, so a report
on a large dataset reads a few shards, not the dataset.
"""

from __future__ import annotations

import base64
import collections
import html
import io
import os
from typing import Any

from s3tfr import storage
from s3tfr.s3 import S3Config
from transforms.duplicates import NEAR_BITS, conflicts, straddles
from transforms.verify import iter_records, parse_example

__all__ = ["MAX_SAMPLE_SHARDS", "REPORT_FILE", "sample_examples", "write_report"]

REPORT_FILE = "index.html"
MAX_SAMPLE_SHARDS = 8
MAX_REJECTED_ROWS = 500
_THUMB = 128
_STYLE = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px}h3{font-size:15px;margin:14px 0 2px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:13px}th{background:#f0f0f0}td.n{text-align:right}
img{max-width:100%}.muted{color:#777}
"""


def sample_examples(
    root: str, info: dict, per_class: int, config: S3Config | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Up to ``per_class`` decoded examples per class, from the first shards.

    Returns:
        ``{class name: [{"image": PIL image, "label": int, "filename": str, "split": str}]}``
    """
    from PIL import Image

    labels = info["labels"]
    samples: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    if per_class <= 0:
        return samples
    order = sorted(info["splits"], key=lambda s: (s != "train", s))
    shards = [(s, e["file"]) for s in order for e in info["splits"][s]["shards"]]
    for split, name in shards[:MAX_SAMPLE_SHARDS]:
        try:
            for record in iter_records(
                storage.join(root, name), info.get("compression", ""), config
            ):
                features = parse_example(record)
                text = features["image/class/text"].decode("utf-8", "replace")
                if len(samples.get(text, [None] * per_class)) >= per_class:
                    continue
                image = Image.open(io.BytesIO(features["image/encoded"]))
                image.load()
                size = image.size
                image.thumbnail((_THUMB, _THUMB))
                samples[text].append(
                    {
                        "image": image,
                        "size": size,
                        "label": features["image/class/label"],
                        "filename": features["image/filename"].decode(
                            "utf-8", "replace"
                        ),
                        "split": split,
                    }
                )
                if all(len(v) >= per_class for v in samples.values()):
                    return samples
        except (OSError, ValueError):
            continue  # a damaged shard: --verify names it; the sheet uses the others
    return samples


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(out.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


# Up to this many classes the chart has one named bar per class; beyond it, names stop
# being readable at any size a page shows, so the chart is the sorted distribution and the
# classes at both ends by name (every class is in the table above it).
MAX_NAMED_CLASSES = 40
# Classes named at each end of a larger distribution.
EXTREME_CLASSES = 15
# Longer class names are cut, with an ellipsis, on the axis (the table has them whole).
AXIS_NAME_CHARS = 28


def _axis_name(label: str) -> str:
    return (
        label if len(label) <= AXIS_NAME_CHARS else label[: AXIS_NAME_CHARS - 1] + "…"
    )


def _named_bars(axes, labels: list[str], values: list[int]) -> None:
    """Horizontal bars, one named row per class, first class at the top."""
    bars = axes.barh(range(len(labels)), values, color="#4878cf")
    axes.bar_label(bars, fontsize=8, padding=2)
    axes.set_yticks(
        range(len(labels)), [_axis_name(label) for label in labels], fontsize=8
    )
    axes.set_ylim(len(labels) - 0.5, -0.5)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.margins(x=0.15)  # room for the count after the longest bar


def class_chart(split: str, labels: list[str], counts: dict[str, int]):
    """The class distribution of one split as a matplotlib figure (see
    ``MAX_NAMED_CLASSES``)."""
    import matplotlib.pyplot as plt

    values = [counts.get(label, 0) for label in labels]
    title = f"{split}: {sum(values)} examples, {len(labels)} classes"
    if len(labels) <= MAX_NAMED_CLASSES:
        figure, axes = plt.subplots(figsize=(7, 0.9 + 0.24 * max(len(labels), 1)))
        _named_bars(axes, labels, values)
        axes.set_xlabel("examples")
        axes.set_title(title)
        figure.tight_layout()
        return figure
    order = sorted(range(len(labels)), key=lambda i: (values[i], labels[i]))
    figure, (spread, fewest, most) = plt.subplots(
        1, 3, figsize=(15, 0.9 + 0.24 * EXTREME_CLASSES), width_ratios=(1.2, 1, 1)
    )
    spread.plot(
        range(1, len(labels) + 1), sorted(values, reverse=True), color="#4878cf"
    )
    spread.set_xlabel("classes, most examples first")
    spread.set_ylabel("examples")
    spread.set_ylim(bottom=0)
    spread.set_title("all classes")
    _named_bars(fewest, [labels[i] for i in order[:EXTREME_CLASSES]],
                [values[i] for i in order[:EXTREME_CLASSES]])  # fmt: skip
    fewest.set_title(f"the {EXTREME_CLASSES} with fewest")
    top = order[::-1][:EXTREME_CLASSES]
    _named_bars(most, [labels[i] for i in top], [values[i] for i in top])
    most.set_title(f"the {EXTREME_CLASSES} with most")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _contact_sheet(label: str, examples: list[dict], columns: int = 4) -> str:
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(examples) // columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(examples):
            example = examples[i]
            ax.imshow(
                example["image"], cmap="gray" if example["image"].mode == "L" else None
            )
            ax.set_title(f"{label} ({example['label']})\n{os.path.basename(example['filename'])}",
                         fontsize=8)  # fmt: skip
    return _png(figure)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        return f"<td{' class=n' if numeric else ''}>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# Duplicate groups listed on the page (the counts cover all of them).
MAX_DUPLICATE_ROWS = 100


def _duplicates(report) -> list[str]:
    """The duplicate section: counts per kind, then the groups, those straddling splits
    first (``inspect --verify`` finds them from every record; without it, a note)."""
    parts = ["<h2 id=duplicates>Duplicates</h2>"]
    if report is None:
        parts.append("<p class=muted>Not checked: <code>inspect --verify --report DIR</code> "
                     "reads every record and adds them here.</p>")  # fmt: skip
        return parts
    kinds = {"exact": "exact (same source bytes)",
             "near": f"near (perceptual hash within {NEAR_BITS} of 64 bits)"}  # fmt: skip
    parts.append(_table(
        ["kind", "groups", "records", "straddling splits", "across classes"],
        [[kinds[kind], *numbers] for kind, *numbers in report.summary()],
    ))  # fmt: skip
    rows = []
    for kind, groups in (("exact", report.exact), ("near", report.near)):
        for group in groups:
            where = [w for w, test in (("splits", straddles), ("classes", conflicts))
                     if test(group)]  # fmt: skip
            members = ", ".join(f"{fp.name} ({fp.split}, {fp.label})" for fp in group)
            rows.append([kind, " and ".join(where) or "-", members])
    rows.sort(key=lambda row: ("splits" not in row[1], "classes" not in row[1]))
    if rows:
        parts.append(_table(["kind", "across", "records (split, class)"],
                            rows[:MAX_DUPLICATE_ROWS]))  # fmt: skip
        if len(rows) > MAX_DUPLICATE_ROWS:
            parts.append(f"<p class=muted>first {MAX_DUPLICATE_ROWS} of {len(rows)} groups; "
                         "<code>inspect --verify</code> prints them</p>")  # fmt: skip
    else:
        parts.append("<p>None found.</p>")
    return parts


def _render(
    root: str, info: dict, rejected: list[dict], samples: dict, duplicates=None
) -> str:
    labels = info["labels"]
    splits = info["splits"]
    parts = [
        "<!doctype html><html><head><meta charset=utf-8>",
        f"<title>Dataset report: {html.escape(root)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Dataset report: {html.escape(root)}</h1>",
        "<h2 id=overview>Overview</h2>",
        _table(
            ["split", "examples", "shards", "MB"],
            [
                [s, e["examples"], e["num_shards"], round(e["bytes"] / 1e6, 2)]
                for s, e in splits.items()
            ],
        ),
    ]
    counts = info.get("counts", {})
    parts.append(
        f"<p>{len(labels)} classes; listed {counts.get('listed', '?')}, converted "
        f"{counts.get('converted', '?')}, rejected {counts.get('rejected', len(rejected))}. "
        f"Source: {html.escape(str(info.get('source', {}).get('uri', '?')))}. Compression: "
        f"{html.escape(info.get('compression') or 'none')}.</p>"
    )
    parts.append("<h2 id=classes>Class distribution</h2>")
    parts.append(
        _table(
            ["label", "class", *splits],
            [
                [
                    i,
                    label,
                    *(splits[s].get("class_counts", {}).get(label, 0) for s in splits),
                ]
                for i, label in enumerate(labels)
            ],
        )
    )
    for split, entry in splits.items():
        chart = _png(class_chart(split, labels, entry.get("class_counts", {})))
        parts.append(
            f"<div class=chart>{_img(chart, f'class distribution of {split}')}</div>"
        )
    parts.append("<h2 id=samples>Examples per class</h2>")
    for index, label in enumerate(labels):
        examples = samples.get(label, [])
        if examples:
            sheet = _contact_sheet(label, examples)
            parts.append(f"<h3>label {index}: {html.escape(label)}</h3>")
            parts.append(
                f"<div class=sheet>{_img(sheet, f'examples of {label}')}</div>"
            )
        else:
            parts.append(f"<p class=muted>label {index}: {html.escape(label)}: no examples "
                         "in the sampled shards</p>")  # fmt: skip
    parts.append(f"<h2 id=rejected>Rejected inputs ({len(rejected)})</h2>")
    if rejected:
        by_code = collections.Counter(r.get("code", "?") for r in rejected)
        parts.append(_table(["reason code", "inputs"], by_code.most_common()))
        rows = [[r.get("key", ""), r.get("stage", ""), r.get("code", ""), r.get("reason", "")]
                for r in rejected[:MAX_REJECTED_ROWS]]  # fmt: skip
        parts.append(_table(["key", "stage", "code", "reason"], rows))
        if len(rejected) > MAX_REJECTED_ROWS:
            parts.append(f"<p class=muted>first {MAX_REJECTED_ROWS} of {len(rejected)}; "
                         "all are in rejected.jsonl</p>")  # fmt: skip
    else:
        parts.append("<p>None: every listed input was converted.</p>")
    parts.extend(_duplicates(duplicates))
    parts.append("<h2 id=sizes>Image sizes</h2>")
    stats = info.get("image_stats", {})
    rows = [[axis.replace("_", " "), stats[axis]["min"], stats[axis]["mean"], stats[axis]["max"]]
            for axis in ("source_width", "source_height") if axis in stats]  # fmt: skip
    shapes = collections.Counter(
        f"{e['size'][0]}x{e['size'][1]}" for v in samples.values() for e in v
    )
    parts.append(_table(["", "min", "mean", "max"], rows))
    if stats.get("source_formats"):
        parts.append(
            _table(["source format", "images"], list(stats["source_formats"].items()))
        )
    options = info.get("options", {})
    parts.append(f"<p>Resize option: {html.escape(str(options.get('resize', '?')))}; "
                 "stored sizes of the sampled images: "
                 f"{html.escape(', '.join(f'{k} ×{v}' for k, v in shapes.most_common(5)))}"
                 "</p>")  # fmt: skip
    parts.append("<h2 id=options>Conversion options</h2>")
    parts.append(_table(["option", "value"], [[k, str(v)] for k, v in options.items()]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(
    root: str,
    info: dict,
    rejected: list[dict],
    out_dir: str,
    samples_per_class: int = 8,
    config: S3Config | None = None,
    duplicates=None,
) -> str:
    """Writes ``out_dir/index.html`` for the dataset at ``root``.

    Args:
        root: the dataset prefix (``s3://`` or local).
        info: its validated manifest.
        rejected: the parsed lines of its ``rejected.jsonl``.
        out_dir: a local directory (created if needed).
        samples_per_class: decoded examples per class on the contact sheets.
        config: S3 client settings.
        duplicates: the ``DuplicateReport`` of ``inspect --verify``, if it ran.

    Returns:
        The path of the written page.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: render to PNG bytes only
    samples = sample_examples(root, info, samples_per_class, config)
    page = _render(root, info, rejected, samples, duplicates)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
