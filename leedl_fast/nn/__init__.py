"""Drop-in modules with the constructor arguments, parameter names and forward signatures of torch.nn's."""
__all__: list[str] = []
