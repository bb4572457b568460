"""maskd_core: MasKD (Masked Distillation with Receptive Tokens) as a PyTorch library.

Importing the package is cheap: ``maskd_core.spec`` needs only pydantic, so the API can parse
job specs without loading torch. The training side lives in ``taps``, ``tokens``, ``losses``,
``stages`` and ``runner``.
"""

__version__ = "0.1.0"
