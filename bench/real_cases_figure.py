"""The figures of docs/real_data.md's held-out sections: r per real patient and task, engine settings.

    python bench/real_cases_figure.py [--single OUT1 [OUT2 ...]] [--auto ...] [--flip_auto ...] [--guided ...]
                                      [--coarse ...] [--output docs/real_data_auto_scales.png]

Each OUT is the output folder of one ``configs/evaluate.yaml`` run on real BIDS data (its ``metrics.csv``; several
folders per setting when the patients were evaluated apart): ``--single`` with ``--intensity_scales "[1.0]"
--guided_filter_radius 0``, ``--auto`` with ``--guided_filter_radius 0``, ``--flip_auto`` with that and
``--flip_averaging true``, ``--guided`` with the defaults of version 0.4.0, ``--coarse`` with those and
``--coarse_pass true``; any of them, at least one. One panel per patient: the input's |r|, the oracle lookup table's r
(from the first setting given) and the text model's r under each setting, per task.
"""

from __future__ import annotations

import argparse
import csv
import os

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("T1w->T2w", "T1w->FLAIR", "T1w->T1CE", "T2w->FLAIR", "FLAIR->T1w")
BASELINES = (("input (identity)", "tab:red"), ("oracle LUT", "tab:purple"))
SETTINGS = (("single", "input scale 1 (before 0.3.0)", "tab:gray"), ("auto", "auto (0.3.0)", "tab:blue"),
            ("flip_auto", "auto + flip averaging", "tab:cyan"), ("guided", "auto, guided (0.4.0 default)", "tab:green"),
            ("coarse", "+ coarse pass (0.5.0 opt-in)", "tab:orange"))


def pearson(folders: list[str]) -> dict[tuple[str, str, str], float]:
    """(subject, task, method) -> Pearson r over the ``metrics.csv`` of ``folders``."""
    table = {}
    for folder in folders:
        with open(os.path.join(folder, "metrics.csv"), newline="") as handle:
            for row in csv.DictReader(handle):
                table[(row["subject"], row["task"], row["method"])] = float(row["pearson"])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for setting, _, _ in SETTINGS:
        parser.add_argument(f"--{setting}", nargs="+", help="evaluate output folders")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(HERE), "bundle", "docs",
                                                         "real_data_auto_scales.png"))
    args = parser.parse_args()
    if not any(getattr(args, name) for name, _, _ in SETTINGS):
        parser.error("expected the output folders of at least one setting")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = [(label, colour, pearson(getattr(args, name)))
                for name, label, colour in SETTINGS if getattr(args, name)]
    single = settings[0][2]
    series = [*BASELINES, *((label, colour) for label, colour, _ in settings)]
    width = 0.8 / len(series)
    subjects = list(dict.fromkeys(subject for subject, _, _ in single))
    figure, axes = plt.subplots(1, len(subjects), figsize=(5.7 * len(subjects), 4.2), sharey=True, squeeze=False)
    for axis, subject in zip(axes[0], subjects):
        values = [[abs(single[(subject, task, "identity")]) for task in TASKS],
                  [single[(subject, task, "oracle-lut")] for task in TASKS],
                  *[[run[(subject, task, "tumsyn")] for task in TASKS] for _, _, run in settings]]
        positions = np.arange(len(TASKS))
        for k, ((label, colour), heights) in enumerate(zip(series, values)):
            axis.bar(positions + (k - (len(series) - 1) / 2) * width, heights, width, label=label, color=colour)
        axis.set_xticks(positions)
        axis.set_xticklabels([task.replace("->", " -> ") for task in TASKS], rotation=25, ha="right")
        axis.set_title(subject, fontsize=10)
        axis.set_ylim(0, 1)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Pearson r inside the brain; input: |r|")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=len(series), fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    figure.savefig(args.output, dpi=90)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
