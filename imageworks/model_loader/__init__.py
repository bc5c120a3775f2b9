"""``imageworks.model_loader``: the Python API of older ImageWorks, as a thin layer over ``imageworks_core``.

Existing consumers keep their imports: ``registry`` (``load_registry(force=True)``, ``get_entry``,
``save_registry``, ``remove_entry``, ``RegistryLoadError``), ``service`` (``select_model``,
``CapabilityError``), ``role_selection`` (``select_by_role``, ``list_models_for_role``), ``models``
(``RegistryEntry``) and ``testing_filters`` (``is_testing_entry``). Every call goes to the service object
(:class:`imageworks_core.service.ImageWorks`); the rules (selection, validation, writes) live once, there.
See the README's "Coming from ImageWorks" for what differs.
"""
