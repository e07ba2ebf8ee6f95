"""Instance-level noise analysis of finished runs (``python -m distnoisy.analyze``).

How memorised label noise hurts rare and frequent instances, and what each treatment changes
(docs/analysis.md). Modules, one concept each:

- :mod:`~distnoisy.analyze.config`: the ``analysis.*`` config;
- :mod:`~distnoisy.analyze.knn`: the frequency score (exact, chunked k-NN density);
- :mod:`~distnoisy.analyze.memorization`: first memorised epoch and persistence from histories;
- :mod:`~distnoisy.analyze.buckets`: quantile buckets and per-bucket statistics;
- :mod:`~distnoisy.analyze.embed`: a run's features and test logits;
- :mod:`~distnoisy.analyze.pipeline`: checks and the analysis of a set of runs;
- :mod:`~distnoisy.analyze.report`: analysis.md / .csv / .png;
- :mod:`~distnoisy.analyze.cli`: the command and its MLflow run;
- :mod:`~distnoisy.analyze.experiment`: the script behind docs/results/instance_level.md.
"""
