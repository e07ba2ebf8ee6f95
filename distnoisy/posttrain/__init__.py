"""Post-training by influence on the decision boundary (``python -m distnoisy.posttrain``).

A trained model has bent its decision boundary around its mislabelled training samples. On the
frozen backbone's features, post-training refits the linear head, ranks the training samples by
their influence on it (:mod:`.influence`), removes the most influential ones a few at a time and
refits (:mod:`.rounds`), and stops when the accuracy on the noisy validation labels stops
improving. docs/posttrain.md gives the formulas.
"""
