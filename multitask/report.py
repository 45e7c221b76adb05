"""`mt report`: one self-contained HTML page of a run (its scores, the rounds' training curves that
curves.py drew, confusion matrices, per-class F1, the most confident mistakes, pseudo labels)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.run import SOFT_FILE, atomic_write_text, head_probs, load_npz, read_json


GALLERY = 12  # the most confident OOF mistakes shown


def png(fig, dpi: int = 80) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def confusion_figure(task, truth: np.ndarray, classes: np.ndarray, title: str):
    """Per factor and for the final class: rows the true class, columns the predicted one, each row
    shaded by its share, the counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from multitask.metrics import confusion

    pred = task.decode(classes)
    panels = [(f.name, f.classes, truth[:, i], pred[:, i]) for i, f in enumerate(task.factors)]
    panels.append(("final class", task.class_titles(), task.encode(truth), classes))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * (len(panels) - 1) + 7, 6),
                             gridspec_kw={"width_ratios": [1] * (len(panels) - 1) + [2.2]})
    for ax, (name, labels, t, p) in zip(np.atleast_1d(axes), panels):
        n = len(labels)
        cm = confusion(t, p, n)
        share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for r in range(n):
            for c in range(n):
                if cm[r, c]:
                    ax.text(c, r, f"{cm[r, c]}", ha="center", va="center", fontsize=7 if n < 10 else 6,
                            color="white" if share[r, c] > 0.6 else "black")
        ax.set(title=name, xlabel="predicted", ylabel="true", xticks=range(n), yticks=range(n))
        ax.set_xticklabels(labels, rotation=90 if n > 6 else 30, fontsize=6)
        ax.set_yticklabels(labels, fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def per_class_rows(y: np.ndarray, p: np.ndarray, names: list[str]) -> list[tuple]:
    """(class, support, precision, recall, F1) for every class in the truth or the prediction."""
    out = []
    for c, name in enumerate(names):
        tp, support, predicted = int(((y == c) & (p == c)).sum()), int((y == c).sum()), int((p == c).sum())
        if not support and not predicted:
            continue
        prec, rec = tp / max(predicted, 1), tp / max(support, 1)
        out.append((name, support, prec, rec, 2 * tp / max(support + predicted, 1)))
    return out


def thumbnail(path: str, size: int = 96) -> str:
    from PIL import Image

    from multitask.data.cache import DECODE_ERRORS, upright_rgb

    try:
        with Image.open(path) as im:
            im = upright_rgb(im)
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except DECODE_ERRORS:
        return ""


STUDENT = ("<p><b>A distilled student</b> (<code>mt distill</code>): what this page calls OOF is its one "
           "validation fold, whose persons the teacher's other folds trained on. Its figures are optimistic, "
           "not an out-of-fold estimate.</p>")


def write_report(run_dir) -> Path:
    """RUN/report.html: scores per round, curves, confusion matrices, per-class figures, the most
    confident OOF mistakes with their pictures, pseudo-label statistics, and the resolved config;
    every picture embedded, nothing fetched."""
    from multitask.context import reopen_context
    from multitask.decide import load_decision, predict_classes
    from multitask.subjects import stored_pictures

    ctx = reopen_context(run_dir, with_images=False)
    run, task, heads, cfg = ctx.run, ctx.task, ctx.heads, ctx.cfg
    r, why = run.shown_round(cfg.train.folds)  # once the round's results are written
    summaries = {q: read_json(run.round_dir(q) / "summary.json") for q in run.rounds()}
    fitted = {q: read_json(run.round_dir(q) / "decision.json")["decision"] for q in summaries
              if (run.round_dir(q) / "decision.json").exists()}  # what each round's decision fitted
    oof = load_npz(run.round_dir(r) / "oof.npz")
    combined, classes = predict_classes(task, heads, head_probs(oof), cfg, load_decision(run.round_dir(r)),
                                        stored_pictures(oof))
    truth = oof["factors"]
    paths = ctx.table.train["path"].to_numpy()[oof["rows"]]
    parts = [f"<h1>{html.escape(run.root.name)}</h1><p>task <b>{html.escape(task.name)}</b>, heads "
             f"<b>{html.escape(','.join(h.name for h in heads))}</b>, backbone <b>{html.escape(cfg.model.backbone)}</b>, "
             f"{cfg.data.img_size[0]}×{cfg.data.img_size[1]} px, {cfg.train.folds} folds × {cfg.train.epochs} epochs. "
             f"The figures below are of {html.escape(why)}.</p>",
             STUDENT if cfg.distill is not None else "",
             scores_section(summaries, fitted, cfg.train.folds),
             curves_section(run),
             '<h2 id="confusion">Confusion matrices (OOF)</h2>'
             + img(png(confusion_figure(task, truth, classes, f"OOF, round {r}, under the run's decision"), dpi=120),
                   "confusion"),
             per_class_section(task, truth, classes),
             mistakes_section(task, truth, combined, classes, paths),
             pseudo_section(run, task, cfg.train.folds),
             f'<h2 id="config">Resolved config</h2><pre>{html.escape(run.config.read_text(encoding="utf-8"))}</pre>']
    out = run.report
    atomic_write_text(out, PAGE.format(title=html.escape(f"mt report: {run.root.name}"), body="\n".join(parts)))
    return out


def scores_section(summaries: dict[int, dict], fitted: dict[int, dict], n_folds: int) -> str:
    """Each round's OOF macro F1s, under its decision in-sample and fold-honest with what the decision
    fitted (`fitted`: each round's decision.json), and each fold's own figures."""
    keys = [k for k in summaries[min(summaries)]["oof"] if k.startswith("f1")]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(f"<tr><td>{q}</td><td>{len(s['folds_done'])}/{n_folds}</td>"
                   + "".join(f"<td>{s['oof'].get(k, float('nan')):.4f}</td>" for k in keys) + "</tr>"
                   for q, s in summaries.items())
    decided = "".join(f"<tr><td>{q}</td><td>{s['decision']['in_sample']['f1']:.4f}</td>"
                      f"<td>{honest(s['decision'])}</td><td>{html.escape(decision_line(fitted.get(q, {})))}</td>"
                      f"</tr>" for q, s in summaries.items() if "decision" in s)
    folds = "".join(f"<tr><td>{q}</td><td>{k}</td><td>{f['best_epoch']}</td><td>{f['val_f1_no_tta']:.4f}</td>"
                    f"<td>{f['oof_f1_tta']:.4f}</td><td>{f['train_s']:.0f}</td></tr>"
                    for q, s in summaries.items() for k, f in s.get("folds", {}).items())
    return (f'<h2 id="scores">OOF macro F1 per round</h2><table><tr><th>round</th><th>folds</th>{head}</tr>{body}</table>'
            "<p>f1_&lt;head&gt;: the head's own argmax; f1_&lt;factor&gt;_combined: the factor read off the final class; "
            "f1: the final class, what is scored.</p>"
            # the confusion and per-class figures below are under the decision: their F1 is this
            # table's in-sample one, not the argmax above
            + (f"<p>Under the round's fitted decision (what submit applies, and what the figures below show):</p>"
               f"<table><tr><th>round</th><th>f1, in-sample (fitted on these OOF: optimistic)</th>"
               f"<th>f1, fold-honest (each fold decided by a fit on the others)</th><th>what was fitted</th></tr>"
               f"{decided}</table>" if decided else "")
            + ("<p>Each fold (its validation persons are its share of the OOF):</p><table><tr><th>round</th>"
               "<th>fold</th><th>best epoch</th><th>validation f1 at it (no TTA)</th><th>OOF f1 (TTA)</th>"
               f"<th>train s</th></tr>{folds}</table>" if folds else ""))


def honest(decision: dict) -> str:
    """The decision's fold-honest F1, or why there is none (OOF of one fold)."""
    return f"{decision['honest']['f1']:.4f}" if decision.get("honest") else "one fold: none"


def decision_line(d: dict) -> str:
    """A fitted decision in a few words: subjects' weight, each auxiliary blend, offsets or none."""
    parts = [f"subjects {d.get('subjects', 0):.2f}"] + [f"{f} blend {w:.2f}" for f, w in d.get("blend", {}).items()]
    return ", ".join(parts + ["offsets" if d.get("offsets") else "no offsets"])


def curves_section(run) -> str:
    parts = ['<h2 id="curves">Training curves</h2>']
    for q in run.rounds():
        curves = run.round_dir(q) / "curves.png"
        if curves.exists():
            parts.append(f"<h3>round {q}</h3>" + img(curves.read_bytes(), f"training curves of round {q}"))
    return "\n".join(parts)


def per_class_section(task, truth: np.ndarray, classes: np.ndarray) -> str:
    rows = per_class_rows(task.encode(truth), classes, task.class_titles())
    return ('<h2 id="per-class">Per class (OOF)</h2><table><tr><th>class</th><th>support</th><th>precision</th>'
            "<th>recall</th><th>F1</th></tr>"
            + "".join(f"<tr><td>{html.escape(n)}</td><td>{s}</td><td>{pr:.3f}</td><td>{rc:.3f}</td><td>{f:.3f}</td></tr>"
                      for n, s, pr, rc, f in rows) + "</table>")


def mistakes_section(task, truth: np.ndarray, combined: np.ndarray, classes: np.ndarray, paths: np.ndarray) -> str:
    """The OOF pictures the decision got wrong with the most confidence, as thumbnails."""
    y, names = task.encode(truth), task.class_titles()
    wrong = np.flatnonzero(classes != y)
    conf = combined[np.arange(len(classes)), classes]
    worst = wrong[np.argsort(-conf[wrong])][:GALLERY]
    cards = "".join(f'<figure><img src="{thumbnail(paths[i])}" alt="{html.escape(str(paths[i]))}">'
                    f"<figcaption>true {html.escape(names[y[i]])}<br>predicted <b>{html.escape(names[classes[i]])}</b> "
                    f"({conf[i]:.2f})<br><small>{html.escape('/'.join(Path(paths[i]).parts[-2:]))}</small></figcaption></figure>"
                    for i in worst)
    return f'<h2 id="mistakes">The most confident OOF mistakes</h2><div class="gallery">{cards or "none"}</div>'


def pseudo_section(run, task, n_folds: int) -> str:
    """Per pseudo-label round and factor: what was selected, at which threshold, with what OOF precision."""
    rows = []
    for q in run.rounds():
        table_path, promise_path = run.round_dir(q) / "pseudo.csv", run.round_dir(q) / "pseudo.json"
        if (run.round_dir(q) / SOFT_FILE).exists():
            rows.append(f"<tr><td>{q}</td><td>every factor</td><td>soft: every test image, with its fold's "
                        f"previous probabilities</td><td>—</td><td>—</td></tr>")
            continue
        if not table_path.exists():
            continue
        chosen = pd.read_csv(table_path)
        promise = read_json(promise_path)["factors"] if promise_path.exists() else {}
        for f in task.factors:
            counts = chosen[f.name][chosen[f.name] >= 0].value_counts()
            # per fold: every fold, those that selected nothing among them; one decimal, or a rare
            # class chosen twice over five folds would read 0
            per_class = ", ".join(f"{f.classes[int(c)]} {n / n_folds:.1f}" for c, n in sorted(counts.items()))
            p = promise.get(f.name, {})
            prec = f"{p['precision']:.3f}" if p.get("precision") is not None else "—"
            if p.get("persons") is not None:  # runs of earlier versions did not count them
                prec += f" ({p['persons']} persons" + (f", lower bound {p['lower_bound']:.3f})"
                                                       if p.get("lower_bound") is not None else ")")
            thr = f"{p['threshold']:.3f}" if p.get("threshold") is not None else "none reaches it"
            rows.append(f"<tr><td>{q}</td><td>{html.escape(f.name)}</td><td>{html.escape(per_class) or '—'}</td>"
                        f"<td>{thr}</td><td>{prec}</td></tr>")
    return '<h2 id="pseudo">Pseudo labels</h2>' + (
        "<table><tr><th>round</th><th>factor</th><th>selected per class (per fold)</th><th>threshold</th>"
        "<th>precision on OOF at that threshold (persons above it)</th></tr>" + "".join(rows) + "</table>" if rows else
        "<p>No pseudo-label round (<code>mt pseudo-label</code> adds one).</p>")


def img(data: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{html.escape(alt)}">'


# the script marks how many pictures loaded, so a headless browser (the test) can tell
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }} img {{ max-width: 100%; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 10px; }} figure {{ margin: 0; width: 150px; font-size: 12px; }}
figure img {{ width: 96px; height: 96px; object-fit: cover; }} pre {{ background: #f6f6f6; padding: 1em; overflow: auto; }}
</style></head>
<body>
{body}
<script>
window.addEventListener("load", () => {{
  const all = Array.from(document.images);
  const ok = all.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + all.length);
}});
</script>
</body></html>
"""
