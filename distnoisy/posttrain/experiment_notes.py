"""The prose of docs/results/posttrain.md: the set-up and how to read the tables (the figures
and the bars' verdicts are computed by :mod:`distnoisy.posttrain.experiment_page`)."""

from __future__ import annotations

SETUP = """Runs: the shared grid (`distnoisy.driver.grid`), one process each, untracked.
**Fashion-MNIST** in the set-up of [fashion_mnist.md](fashion_mnist.md) (4,000 training
images of which 10% are the validation split, `lenet`, 40 epochs, the 10,000 test images) and
**digits** (the default job with a 10% validation split, `small_cnn`, 60 epochs, 360 test
images: one image is 0.28 points); 40% symmetric and 40% instance-dependent noise (noise seed
0); training seeds 0, 1, 2; every method with its defaults. Mean ± std over the seeds; every
accuracy is clean test accuracy in %.

*final*: the run's last epoch. *val-selected (early stopping)*: the run's own test accuracy at
its best validation epoch (`test_acc_at_best_val`), the figure post-training has to beat.
*post-trained, head only*: `python -m distnoisy.posttrain run=<run>` with the defaults (the
rounds on the frozen features of the best-by-validation weights). *fine-tuned*: the same, then
`posttrain.finetune_epochs={finetune_epochs}` epochs of the whole network on the kept samples,
the epoch selected on the validation set as the run selects its own. *cleanlab's recipe*:
out-of-sample probabilities by 5-fold cross-validation of the same head on the same features with
the same penalty, `cleanlab.filter.find_label_issues` (`prune_by_noise_rate`), those samples
removed, the head refit: the only difference from the head-only post-training is which samples
are removed. *removed*: share of the training set removed, and the precision / recall of the
removed set against the truly corrupted samples.
"""

NOTES = """"""
