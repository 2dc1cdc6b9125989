"""Exception classes. Every message says what went wrong and what to do about it."""


class VlmplugError(Exception):
    """Base class of every error vlmplug raises on purpose."""


class UnsupportedModelError(VlmplugError, TypeError):
    """The model's architecture has no adapter; nothing was patched."""


class MethodConfigError(VlmplugError, ValueError):
    """A method name or parameter is invalid; nothing was patched."""


class AlreadyAppliedError(VlmplugError, RuntimeError):
    """The model already carries a vlmplug handle; nothing was patched."""


class LayoutError(VlmplugError, ValueError):
    """Image tokens in the input do not match what the model's configuration implies."""


class TransformersMismatchError(VlmplugError, RuntimeError):
    """The running transformers passed something vlmplug could not read, or a method's hook did not act.

    Raised during a forward instead of returning an answer that silently lacks the method's effect."""


class InputError(VlmplugError, ValueError):
    """An image or prompt the pipeline cannot use (not an image, a prompt that holds image placeholders itself);
    nothing was run and nothing was patched."""
