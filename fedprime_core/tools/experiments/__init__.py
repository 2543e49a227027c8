"""Reproduce the paper's tables with one command: a grid of real `flwr run` federations.

    python -m fedprime_core.tools.experiments run experiments/smoke.yaml
    python -m fedprime_core.tools.experiments report experiments/smoke.yaml   # tables/plots only
    python -m fedprime_core.tools.experiments plan experiments/smoke.yaml     # list the cells

A grid file (YAML)::

    name: smoke
    output: results/experiments/smoke        # relative to the app directory
    federation: {num-supernodes: 4, client-resources-num-cpus: 1}
    base: {num-server-rounds: 6, ...}          # run-config keys shared by every cell
    grids:                                     # named sub-grids: the cartesian product of
      main:                                    # every key given as a list; a name's part
                                               # before '-' picks the table (main-x -> main)
        method: [fedprime, fed-inter, fedavg-p]
        missing-setting: [miss-text, miss-image, miss-both]
        seed: [0, 1]
      robustness: {method: [fedprime, fedavg-p, centralized-p], missing-setting: [miss-both],
                   eta: [0.0, 0.5, 1.0]}

Every cell is one `flwr run . --stream` in simulation with its configuration written to a
TOML file; identical cells of different sub-grids run once. A finished cell (its
``checkpoint.json`` reached ``num-server-rounds``) is never recomputed, and an interrupted
cell resumes from its checkpoint, so a grid can be stopped and restarted at any time. A cell
is named by its method, setting, eta and seed plus a hash of its non-default settings
(:func:`.plan.cell_name`: options added later leave names as they were); a run folder made
with other settings is refused, naming them (:func:`.plan.stale_settings`).
``centralized-p`` cells run with one SuperNode.

A follow-up grid may share arms with an earlier one: ``reuse: [<the other grid's output>]``
makes a finished run there stand for an identical cell here (same name, so same settings;
checked against its ``config.json``). It is read in place and never written; a cell the other
grid has not finished runs here (:meth:`.plan.Plan.reused_from`). ``blind: true`` keeps a study
read blind until it is complete: no tables or plots while any cell is unfinished (``report``
refuses, naming how many are left; ``report --unblind`` reads it early).

Outputs under ``output/``: ``runs/<cell>/`` (each run's results and its flwr log),
``main_table.md/.csv`` (the paper's main layout: method rows per training setting, the
five test settings as columns, mean and std over seeds), ``ablation_table.md/.csv``,
``robustness.png/.csv`` (metric vs missing rate), ``convergence_<setting>.png``, and
``cells.json`` (status and timing of every cell).

Comparison tables (any sub-grids, any keys), declared under ``tables``::

    tables:
      label-skew:                     # -> output/label-skew.md and label-skew.csv
        grids: [label-skew]           # the sub-grid(s) compared (default: the one named like the table)
        round: final                  # final (default) or best: the best-validation round
        extra:                        # optional columns from the rounds of each run's metrics.json
          - {key: bytes-sent, per: sampled, over: mean, scale: 1.0e-3, label: kB sent per client per round}
          - {key: inter-pool-size, over: final}
        differences:                  # optional paired differences between two values of one key
          - {key: method, value: pfpt, minus: fed-intra}

Rows are the combinations of the run-config keys that vary within the table's cells, seed
excepted; columns are the five test settings and ``val`` (metric in %, mean ± std over
seeds), then the extra columns (mean ± std over seeds of each run's value: ``over`` the
rounds that have ``key``, each divided by ``per`` of the same round if given, times
``scale``; ``key`` may be a ``/`` path into a round record, e.g. ``client-eval/test-accuracy``,
the clients' own test sets, or ``eval-top-tau/miss-both/accuracy``, the server's evaluation
with the tau most popular inter centres, which reads ``eval`` where that is the same model;
``clients: [ids]`` on a ``client-eval/`` key restricts it to those clients' sample-weighted mean).
A difference pairs every run having ``key: value`` with the run whose configuration is the
same except ``key: minus`` (so matched on seed and every other key), and reports the mean,
std and a 95% t confidence interval of the per-pair differences, for every column, over all
pairs and over the pairs whose two runs are not the same algorithm in effect
(:func:`.report.no_op_pair`), with the number of such no-op pairs. For
``key: comm-profile`` the keys the profile sets (wire-dtype, upload-delta, query-rank,
exchange-pooler) change with it and are no row keys of their own (``experiments/comm-paired.yaml``).
A difference may change several keys at once (``key``, ``value`` and ``minus`` as lists of equal
length). A table's ``primary: <column>`` adds each difference row's two-sided paired t test on
that column and Holm's adjustment over the table's rows (``<table>_tests.csv``;
:func:`.report.primary_tests`), each row with the smallest difference it could detect with 80%
power at its pairs' sd and Holm's first alpha (:func:`.significance.detectable_difference`).
``margin: <number>`` (with ``primary``) words each test by a reading rule declared with the grid
(:func:`.report.verdict`: higher, lower, no difference of the margin or more, inconclusive).
``level-off: <number>`` (with an ``over: final`` primary column) adds whether each arm had
levelled off: its mean per-run gain between the last two rounds that recorded the column, under
the number (``<table>_levelling.csv``; :func:`.report.levelling`). Every table's md ends with
its runs' checks (:func:`.report.run_checks`): a final value taken from an earlier round than the
run's last, or a client-side column covering fewer clients in some runs.

Modules: :mod:`.plan` reads a grid file into a :class:`~.plan.Plan` of cells, :mod:`.run`
runs the cells as real federations, :mod:`.report` writes the tables and plots from their
results, :mod:`.significance` holds the paired tests and their power, :mod:`.power` sizes a
study from its pilot; ``__main__`` is the command line.
"""
