"""metaif: task- and instance-level influence functions for meta-learning.

Implements Ren et al., "Evaluating Data Influence in Meta Learning" (ICLR 2026);
see docs/method.md for the mathematics and conventions.
"""

__version__ = "0.1.0"
