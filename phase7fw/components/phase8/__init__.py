"""Phase 8 components: the O(T) hyperbolic linear attention (``attention = "hyperbolic_linear"``).

The Phase 8 model is the ``phase7`` model with this attention in its blocks (a recipe, not a
model class: recipes/phase8_*.toml); every other part is Phase 7's.
"""
