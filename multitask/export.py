"""`mt export`: a run's whole inference as one ONNX file, fp32 or int8.

The graph takes a batch of uint8 images (N, H, W, 3), as the decoder gives them, and returns the
final-class probabilities (`final`) and every voted head and auxiliary output (`p_<name>`): every
fold model with every TTA view, the vote, the head product and the auxiliary blend, all inside, so
serving needs no code of ours beyond the argmax with the run's decision offsets (stored with the
task in the file's metadata, see serve.py). A student (`mt distill`) is the same with one model; an
`mt ensemble` run nests its members (which must share an image size) with their weights.

The export is checked against the PyTorch path that `mt predict` runs, on training images, with
onnxruntime: the largest difference is reported, and above `tolerance` nothing is written. `int8`
quantises the convolutions and matrix products statically (onnxruntime, QDQ, per channel), calibrated
on training images, and reports how often its argmax agrees with the fp32 file on other images.
"""
from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from multitask.context import (build_task, check_ensemble_members, check_round, load_run_config, reopen_context,
                               round_trainings)
from multitask.data.augment import tta_view
from multitask.decide import aux_kinds, blend_only, load_decision, predict_classes
from multitask.labels import MARGINAL_FLOOR, Head, Task
from multitask.numeric import aux_activation, aux_name, fine_to_bins, is_aux, spread_or_default, standardise
from multitask.inference import HARD_TIE_BREAK, DecodedImages, load_model, round_models, run_outputs
from multitask.run import RunDir, atomic_write_bytes, check_output_file, read_json, sweep_killed_beside, writer_prefix
from multitask.serve import META_KEY, need_serve_extra, task_meta

FORMAT = 1
TOLERANCE = 1e-4
OPSET = 17


class ExportError(ValueError):
    pass


def factor_marginal(combined: torch.Tensor, sizes: tuple[int, ...], i: int) -> torch.Tensor:
    other = tuple(a + 1 for a in range(len(sizes)) if a != i)
    full = combined.reshape(-1, *sizes)  # -1, not len(): the batch stays dynamic in the graph
    return full.sum(other) if other else full


def with_marginal(combined: torch.Tensor, sizes: tuple[int, ...], i: int, p: torch.Tensor, q: torch.Tensor,
                  codes: torch.Tensor) -> torch.Tensor:
    """Task.with_marginal in torch ops (`p`: factor i's marginal of `combined`, `codes`: each final
    class's class of factor i): a class ruled out takes its share of q at the other factors' odds."""
    full = combined.reshape(-1, *sizes)
    others = full.sum(i + 1, keepdim=True).expand_as(full).reshape(-1, math.prod(sizes))  # -1: a dynamic batch
    q_cells, p_cells = q.index_select(1, codes), p.index_select(1, codes)
    return torch.where(p_cells > MARGINAL_FLOOR, combined * q_cells / p_cells.clamp(min=MARGINAL_FLOOR),
                       q_cells * others)


QUANTISED_OPS = ("Conv", "Gemm", "MatMul")  # what `--int8` turns to int8


def aux_bin_probs(kind: str, out: torch.Tensor, cuts: list[float], centre: float, scale: float,
                  sigma: float, owner: torch.Tensor | None = None) -> torch.Tensor:
    """numeric.aux_bins in torch ops that ONNX has (Erf; a running minimum unrolled; a distribution's
    fine bins summed by a 0/1 matrix, `owner` holding each fine bin's bin). The sum is a product and
    a ReduceSum, not a MatMul: `--int8` quantises every MatMul (QUANTISED_OPS), and the blend stays fp32."""
    if kind == "distribution":
        member = (owner[:, None] == torch.arange(len(cuts) + 1)[None, :]).to(out.dtype)
        p = (out.clamp(min=0)[:, :, None] * member[None]).sum(1)
        p = p.clamp(min=1e-9)
        return p / p.sum(1, keepdim=True)
    if kind == "ordinal":
        cols = [out[:, :1].clamp(0, 1)]
        for j in range(1, out.shape[1]):
            cols.append(torch.minimum(cols[-1], out[:, j:j + 1].clamp(0, 1)))
        s = torch.cat(cols, 1)
    else:
        mu = out[:, :1] * scale + centre
        edges = torch.tensor(cuts, dtype=out.dtype)[None, :]
        s = 1 - 0.5 * (1 + torch.erf((edges - mu) / (max(sigma, 1e-6) * math.sqrt(2))))
    p = torch.cat([1 - s[:, :1], s[:, :-1] - s[:, 1:], s[:, -1:]], 1).clamp(min=1e-9)
    return p / p.sum(1, keepdim=True)


class RunGraph(nn.Module):
    """One run's round: fold models × TTA views → vote → head product → auxiliary blend."""

    def __init__(self, models: list[nn.Module], views: list[str], vote: str, task: Task, heads: list[Head],
                 outputs: list[str], blend: list[dict], aux: dict[str, str]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.views, self.hard, self.sizes, self.outputs, self.blend = list(views), vote == "hard", task.sizes, outputs, blend
        self.aux = aux  # auxiliary output name -> its kind (regression, ordinal or distribution)
        self.head_names = [h.name for h in heads]
        for h in heads:
            self.register_buffer(f"index_{h.name}", torch.as_tensor(task.class_to_head_index(h)), persistent=False)
        for b in blend:
            self.register_buffer(f"codes_{b['factor']}", torch.as_tensor(b["codes"]), persistent=False)
            self.register_buffer(f"owner_{b['factor']}", torch.as_tensor(b["owner"]), persistent=False)

    def one_model(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        total = {}
        for view in self.views:
            for name, logits in model(tta_view(x, view)).items():
                p = aux_activation(logits, self.aux[name]) if is_aux(name) else logits.float().softmax(1)
                total[name] = total[name] + p if name in total else p
        return {name: p / len(self.views) for name, p in total.items()}

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float() / 255
        sets = [self.one_model(m, x) for m in self.models]
        voted = {name: torch.stack([s[name] for s in sets]).mean(0) for name in self.outputs}
        if self.hard:
            for name in self.head_names:
                votes = torch.stack([(s[name] == s[name].amax(1, keepdim=True)).float() for s in sets]).mean(0)
                mixed = votes + HARD_TIE_BREAK * voted[name]
                voted[name] = mixed / mixed.sum(1, keepdim=True)
        combined = None
        for name in self.head_names:
            p = voted[name].index_select(1, getattr(self, f"index_{name}"))
            combined = p if combined is None else combined * p
        for b in self.blend:
            p_f = factor_marginal(combined, self.sizes, b["index"])
            q_aux = aux_bin_probs(b["kind"], voted[b["aux"]], b["cuts"], b["centre"], b["scale"], b["sigma"],
                                  getattr(self, f"owner_{b['factor']}"))
            q = (1 - b["weight"]) * p_f + b["weight"] * q_aux
            combined = with_marginal(combined, self.sizes, b["index"], p_f, q, getattr(self, f"codes_{b['factor']}"))
        return [combined, *[voted[name] for name in self.outputs]]


class EnsembleGraph(nn.Module):
    """An `mt ensemble` run: its members' final-class probabilities, weighted."""

    def __init__(self, members: list[nn.Module], weights: list[float]):
        super().__init__()
        self.members, self.weights = nn.ModuleList(members), list(weights)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        total = sum(w * m(images)[0] for m, w in zip(self.members, self.weights))
        return [total, total]


def build_graph(run: RunDir, r: int) -> tuple[nn.Module, dict]:
    """The run's round as a module (on the CPU, eval mode) and what serve.py needs to know of it."""
    cfg = load_run_config(run)
    task, heads = build_task(cfg)
    size = list(cfg.data.img_size)
    if cfg.ensemble is not None:
        members = [build_graph(RunDir(m), mr) for m, mr in zip(cfg.ensemble.runs, cfg.ensemble.rounds)]
        sizes = {tuple(info["img_size"]) for _, info in members}
        if len(sizes) > 1:
            raise ExportError(f"{run.root}: the ensemble's members take different image sizes {sorted(sizes)}; one ONNX "
                              f"file takes one size: distil the ensemble (`mt distill`) and export the student")
        graph = EnsembleGraph([g for g, _ in members], cfg.ensemble.weights).eval()
        return graph, {"img_size": members[0][1]["img_size"], "outputs": ["p_class"], "folds": sum(i["folds"] for _, i in members),
                       "views": members[0][1]["views"]}
    device = torch.device("cpu")
    models = [load_model(p, cfg, task, heads, device) for p in round_models(run, r, cfg)]
    names = list(models[0].reads)  # heads, then auxiliary outputs
    decision = blend_only(load_decision(run.round_dir(r)))
    kinds = aux_kinds(task, cfg)
    blend = []
    for factor, w in (decision.blend.items() if decision else []):
        if w <= 0:
            continue
        i = task.factor_names.index(factor)
        f = task.factors[i]
        _, centre, scale = standardise(f, np.zeros(1))
        blend.append({"factor": factor, "index": i, "weight": float(w), "kind": kinds[factor], "aux": f"aux_{factor}",
                      "cuts": [float(c) for c in f.cuts], "centre": centre, "scale": scale,
                      "sigma": spread_or_default(f, decision.sigma.get(factor)),
                      "owner": fine_to_bins(f, decision.grid.get(factor, [])),
                      "codes": task.decode(np.arange(task.n_classes))[:, i]})
    aux = {aux_name(factor): kind for factor, kind in kinds.items()}
    graph = RunGraph(models, cfg.aug.tta, cfg.decide.vote, task, heads, names, blend, aux).eval()
    return graph, {"img_size": size, "outputs": [f"p_{n}" for n in names], "folds": len(models), "views": list(cfg.aug.tta)}


def sample_rows(n: int, k: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    rows = np.arange(n) if exclude is None else np.setdiff1d(np.arange(n), exclude)
    return np.sort(np.random.default_rng(seed).permutation(rows)[:k])


def reference(run: RunDir, r: int, decoded: DecodedImages, cfg, task: Task, heads: list[Head],
              decision) -> dict[str, np.ndarray]:
    """What `mt predict` computes on the images: the voted outputs, and the final-class probabilities
    before the offsets. On the CPU in fp32 whatever the run's device: the graph is fp32, and on a GPU
    `mt predict` runs bf16 autocast, whose rounding alone exceeds the tolerance."""
    probs = run_outputs(run, r, ["train.device=cpu"], decoded, np.arange(len(decoded.paths)))
    final = predict_classes(task, heads, probs, cfg, blend_only(decision))[0]
    return {"final": final} | {f"p_{k}": v for k, v in probs.items()}


def run_onnx(path: Path, images: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outs = [session.run(None, {"images": images[i:i + batch]}) for i in range(0, len(images), batch)]
    return {n: np.concatenate([o[j] for o in outs]) for j, n in enumerate(names)}


def metadata(task: Task, info: dict, offsets, run: RunDir, r: int, trainings: dict | None, check: dict) -> str:
    return json.dumps({
        "format": FORMAT, "input": "images", "img_size": info["img_size"], "outputs": ["final", *info["outputs"]],
        "task": task_meta(task),
        "offsets": offsets, "run": str(run.root.resolve()), "round": r, "folds": info["folds"], "views": info["views"],
        "train_ids": trainings, "check": check})


def compact(path: Path) -> None:
    """Short tensor and node names, in place: the exporter's names spell every module's path, which
    in a small model weighs more than its int8 weights."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return  # names in subgraphs may refer to the outer graph's: leave them as they are
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    names = {}
    for i, init in enumerate(g.initializer):
        names[init.name] = init.name if init.name in keep else f"w{i}"
        init.name = names[init.name]
    for i, node in enumerate(g.node):
        node.name = f"n{i}"
        for j, out in enumerate(node.output):
            if out and out not in keep:
                names[out] = names.get(out, f"t{i}_{j}")
                node.output[j] = names[out]
    for node in g.node:
        for j, inp in enumerate(node.input):
            node.input[j] = names.get(inp, inp)
    del g.value_info[:]  # shapes onnxruntime infers again
    onnx.save(model, str(path))


def with_metadata(src: Path, meta: str) -> bytes:
    import onnx

    model = onnx.load(str(src))
    del model.graph.value_info[:]
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, meta
    return model.SerializeToString()


def calibration_reader(images: np.ndarray, batch: int = 32):
    """onnxruntime's calibration reader over a uint8 image array, a batch at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": images[i:i + batch]} for i in range(0, len(images), batch)])

        def get_next(self):
            return next(self.batches, None)

    return Reader()


def quantize(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = calibration_reader(calibration)
    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    # convolutions and matrix products only: the vote, the head product and the blend (written
    # without these ops) stay fp32
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(QUANTISED_OPS))


def export_run(run_dir: str | Path, out: str | Path | None = None, int8: bool = False, round: int | None = None,
               tolerance: float = TOLERANCE, check_images: int = 32, calibration_images: int = 128,
               log=None) -> dict:
    """Write the run's round (by default the one `submit` uses) as one ONNX file; returns the check's
    figures. Nothing is written when the ONNX outputs differ from PyTorch's by more than `tolerance`."""
    need_serve_extra()
    run = RunDir(run_dir)
    cfg = load_run_config(run)
    task, heads = build_task(cfg)
    r, why = run.choose_round(cfg.train.folds, round)
    check_round(run, r, cfg)
    check_ensemble_members(cfg)
    if log:
        log(f"exporting {why}")
    out = Path(out) if out else (run.onnx_int8 if int8 else run.onnx)
    check_output_file(out)
    folds = read_json(run.round_dir(r) / "summary.json")["folds_done"]
    graph, info = build_graph(run, r)
    ctx = reopen_context(run.root, with_images=False)
    paths = ctx.table.train["path"].tolist()
    rows = sample_rows(len(paths), check_images, seed=0)
    decoded = DecodedImages([paths[i] for i in rows], cfg.data.decode_workers)
    images = decoded.whole(tuple(info["img_size"]))  # a picture damaged since training: named, not checked on
    decision = load_decision(run.round_dir(r))
    expected = reference(run, r, decoded, cfg, task, heads, decision)
    now = read_json(run.round_dir(r) / "summary.json")["folds_done"]
    if now != folds:  # the graph and its reference would be of two fold sets: the check would blame the graph
        raise ExportError(f"{run.round_dir(r)}: its folds changed while it was exported ({folds} then {now}: a fold "
                          f"finished in another process); export again once it is done; nothing written")
    offsets = decision.offsets if decision is not None else None
    # named for its writer, so that `mt resume` (in a run) or the next export sweeps one a kill left
    sweep_killed_beside(out)
    with tempfile.TemporaryDirectory(prefix=writer_prefix(out.name), suffix=".tmp",
                                     dir=out.parent if out.parent.exists() else None) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        names = ["final", *info["outputs"]]
        with torch.no_grad(), warnings.catch_warnings():
            # the bin edges and a zoom view's image size are the run's constants: kept as constants in
            # the trace is what is wanted (the check below runs another batch size than the trace's)
            warnings.filterwarnings("ignore", "torch.tensor results are registered as constants", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", "Converting a tensor to a Python integer", torch.jit.TracerWarning,
                                    module="multitask.data.augment")
            torch.onnx.export(graph, (torch.from_numpy(images[:2]),), str(fp32), input_names=["images"],
                              output_names=names, dynamic_axes={n: {0: "batch"} for n in ["images", *names]},
                              opset_version=OPSET, dynamo=False)
        compact(fp32)
        got = run_onnx(fp32, images)
        diff = max(float(np.abs(got[n] - expected[n]).max()) for n in names if n in expected)
        check = {"images": len(images), "max_abs_diff": diff, "tolerance": tolerance,
                 "fp32_mb": fp32.stat().st_size / 2**20}
        if not diff <= tolerance:
            raise ExportError(f"the ONNX graph differs from PyTorch by up to {diff:.3g} on {len(images)} training "
                              f"images (tolerance {tolerance:g}); nothing written")
        final = fp32
        if int8:
            cal_rows = sample_rows(len(paths), calibration_images, seed=1, exclude=rows)
            if not len(cal_rows):  # the check took every training image: calibrate on those
                cal_rows = sample_rows(len(paths), calibration_images, seed=1)
            calibration = DecodedImages([paths[i] for i in cal_rows], cfg.data.decode_workers).whole(tuple(info["img_size"]))
            final = Path(tmp) / "int8.onnx"
            quantize(fp32, final, calibration)
            q = run_onnx(final, images)
            check |= {"int8": True, "int8_agreement": float((q["final"].argmax(1) == got["final"].argmax(1)).mean()),
                      "int8_max_abs_diff": float(np.abs(q["final"] - got["final"]).max()),
                      "calibration_images": len(calibration), "int8_mb": final.stat().st_size / 2**20}
        meta = metadata(task, info, offsets, run, r, round_trainings(run, r, cfg), check)
        atomic_write_bytes(out, with_metadata(final, meta))
    return check | {"out": str(out), "round": r, "mb": out.stat().st_size / 2**20}
