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
removed set against the truly corrupted samples (precision over the seeds that removed
something: it is undefined for an empty set).
"""

NOTES = """## Why the numbers look like this

- **The gain over early stopping is mostly the head refit.** Post-training starts from the
  best-by-validation weights (`posttrain.weights=auto`), so the run's early stopping is its
  starting point; round 0 refits the linear head on those features with the L2 penalty, and in
  most runs the rounds after it were not kept (*kept round* in the per-seed table: -1 is the
  run's own head, 0 the refit with nothing removed). Where the bars are met, the refit and,
  under symmetric noise, the fine-tune carry them.
- **Why post-training often removes nothing.** The rounds are selected on the validation split:
  400 images (10% of 4,000), so one image is 0.25 points. A round is kept only while validation
  accuracy does not fall below the best so far, and `posttrain.patience=2` rounds below it end
  the rounds; when every round is below the run's own head, nothing is removed. The gains a
  5% round brings on test accuracy (a few tenths of a point) are below what 400 images resolve.
  Example, Fashion-MNIST instance noise, CE, seed 0 (`posttrain-default/rounds.md` of that
  run): round 1 removed 180 samples (90.6% of them truly corrupted) and raised test accuracy
  from 74.19% to 74.52%, but validation accuracy went from 76.50% to 76.25% (one image) and
  then 75.50%, so round 0 was kept. With `posttrain.score=grad_norm` on the same run test
  accuracy rose with every round to 77.06% at 30% removed; validation accuracy peaked at 20%
  removed, the kept round (76.63% test accuracy).
- **cleanlab's recipe removes without asking the validation set.** It removes its own estimate
  of the noisy count (`prune_by_noise_rate`, 33-44% of the training set here against 40%
  corrupted), and on most of these runs test accuracy keeps rising with removal, so it wins on
  accuracy in most settings where post-training stopped early, by the most under instance
  noise. Not on LIMIT (symmetric, seed 0): there its removed set is the least precise (81%)
  and costs 0.7 points, while post-training kept the run's own head. Where both removed
  something, post-training's (smaller) removed set is the more precise one in most settings
  and cleanlab's the far more complete one (the bars above; recall in the tables).
- **From the final weights** (the old default) a CE run that memorised its noisy labels ends
  below its own early stopping under symmetric noise (*from final weights* below); this is why
  `posttrain.weights=auto` is the default. Selecting on the noisy validation labels
  (`posttrain.select_on=val_noisy`) is no better on average than on the clean ones.
- **The influence score is not the best one here.** On the settings of the score table
  (CE and GCE, and DAL under symmetric noise) `grad_norm` has the highest mean test accuracy and
  `loss_history` the highest round-1 AUROC; `influence` is neither. The difference is within a
  few tenths of a point under symmetric noise and comes from instance noise (CE and GCE: about
  +2 points for `grad_norm`), where the stopping rule above decides more than the ranking.
  `posttrain.score=influence` is still the default: this comparison covers two methods under
  instance noise, and changing the default redoes every post-training on this page.
"""
