"""The figure of bundle/docs/real_data.md's held-out section: r per real patient and task, three engine settings.

    python bench/real_cases_figure.py --single OUT1 [OUT2 ...] --auto OUT1 [OUT2 ...] --flip_auto OUT1 [OUT2 ...]
                                      [--output bundle/docs/real_data_auto_scales.png]

Each OUT is the output folder of one ``configs/evaluate.yaml`` run on real BIDS data (its ``metrics.csv``; several
folders per setting when the patients were evaluated apart): ``--single`` with ``--intensity_scales "[1.0]"``,
``--auto`` with the defaults, ``--flip_auto`` with ``--flip_averaging true``. One panel per patient: the input's |r|,
the oracle lookup table's r and the text model's r under each setting, per task.
"""

from __future__ import annotations

import argparse
import csv
import os

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("T1w->T2w", "T1w->FLAIR", "T1w->T1CE", "T2w->FLAIR", "FLAIR->T1w")
SERIES = (("input (identity)", "tab:red"), ("oracle LUT", "tab:purple"), ("input scale 1 (before 0.3.0)", "tab:gray"),
          ("auto (default)", "tab:blue"), ("auto + flip averaging", "tab:cyan"))


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
    for setting in ("single", "auto", "flip_auto"):
        parser.add_argument(f"--{setting}", nargs="+", required=True, help="evaluate output folders")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(HERE), "bundle", "docs",
                                                         "real_data_auto_scales.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    single, auto, flip_auto = pearson(args.single), pearson(args.auto), pearson(args.flip_auto)
    subjects = list(dict.fromkeys(subject for subject, _, _ in single))
    figure, axes = plt.subplots(1, len(subjects), figsize=(5.7 * len(subjects), 4.2), sharey=True, squeeze=False)
    for axis, subject in zip(axes[0], subjects):
        values = [[abs(single[(subject, task, "identity")]) for task in TASKS],
                  [single[(subject, task, "oracle-lut")] for task in TASKS],
                  *[[run[(subject, task, "tumsyn")] for task in TASKS] for run in (single, auto, flip_auto)]]
        positions = np.arange(len(TASKS))
        for k, ((label, colour), heights) in enumerate(zip(SERIES, values)):
            axis.bar(positions + (k - 2) * 0.16, heights, 0.16, label=label, color=colour)
        axis.set_xticks(positions)
        axis.set_xticklabels([task.replace("->", " -> ") for task in TASKS], rotation=25, ha="right")
        axis.set_title(subject, fontsize=10)
        axis.set_ylim(0, 1)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Pearson r inside the brain; input: |r|")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=len(SERIES), fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    figure.savefig(args.output, dpi=90)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
