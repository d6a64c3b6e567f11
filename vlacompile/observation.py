"""Observations: the runtime's (``vlacompile_runtime.observation``, their one owner), re-exported
for the compiler's code, which imports them from here."""
from vlacompile_runtime.observation import (  # noqa: F401
    IMAGE_PREFIX,
    STATE_KEY,
    Observation,
    ObservationBatch,
    as_state,
    as_uint8_hwc,
    check_observation,
    from_lerobot,
)
