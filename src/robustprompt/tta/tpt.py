"""TPT (Shu et al., NeurIPS 2022): minimise the entropy of the mean prediction over the most
confident views, predict the test image with the tuned prompt."""
from .base import TTAProcedure, register


@register
class TPT(TTAProcedure):
    name = "tpt"
    title = "TPT"
    summary = "marginal entropy over the 10% most confident views; predicts view 0"
