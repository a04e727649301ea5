"""One error type carries its field through every layer; run statuses are one enum."""

from __future__ import annotations

import pickle

import pytest

from batchlab.core.schedules import build_lr_schedule
from batchlab.engine.spec import RunSpec, RunStatus, SpecError
from batchlab.errors import FieldError
from batchlab.sweep.store import STATUSES, StoreError


@pytest.mark.parametrize("cls", [FieldError, SpecError, StoreError])
def test_field_errors_carry_field_and_message_and_pickle(cls: type[FieldError]) -> None:
    err = cls("schedule_options.gamma", "must be > 0: got -1")
    assert isinstance(err, FieldError) and isinstance(err, ValueError)
    assert (err.field, err.message) == ("schedule_options.gamma", "must be > 0: got -1")
    assert str(err) == "schedule_options.gamma: must be > 0: got -1"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and (back.field, back.message) == (err.field, err.message)


def test_core_errors_name_their_field_without_text_parsing() -> None:
    with pytest.raises(FieldError) as err:
        build_lr_schedule("step", 0.1, 100, nonsense=1)
    assert err.value.field == "schedule_options.nonsense"


def test_spec_errors_keep_the_field_of_the_core_error() -> None:
    with pytest.raises(SpecError) as err:
        RunSpec(task="digits-mlp", batch_size=8, lr=-1.0)
    assert err.value.field == "lr"


def test_one_status_enum_is_what_the_store_accepts() -> None:
    assert [s.value for s in RunStatus] == ["ok", "diverged", "failed"]
    assert tuple(RunStatus) == STATUSES
    assert RunStatus("diverged") is RunStatus.DIVERGED and RunStatus.OK == "ok"
