"""Methods: every setting and method of the survey as one :class:`Method` — names, reference,
an option schema declared once and checked once, how to build it — by name.

``resolve(name, options)`` gives the method and its checked options from those two alone.
"""

from medfed.methods.method import BuildContext, Method, context_for
from medfed.methods.options import Option
from medfed.methods.registry import METHOD_FLAGS, METHODS, resolve, resolve_methods

__all__ = ["METHODS", "METHOD_FLAGS", "BuildContext", "Method", "Option", "context_for", "resolve", "resolve_methods"]
