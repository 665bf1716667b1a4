"""The offline datasets of the experiments: UCR series (sktime's files), MNIST-1D."""

import random

import numpy as np
import pytest

from iterjax.experiments.common import deq_models, ucr

TS = """# a comment
@problemName Toy
@univariate true
@equalLength true
@classLabel true b a
@data
1.0,2.0,3.0:a
-1.5,0.5,4.0:b
"""


def test_parse_ts_reads_series_labels_and_headers():
    x, labels, headers = ucr.parse_ts(TS)
    np.testing.assert_array_equal(x, [[1.0, 2.0, 3.0], [-1.5, 0.5, 4.0]])
    assert labels == ["a", "b"]
    assert headers["classlabel"] == "true b a"


@pytest.mark.parametrize(
    "text, match",
    [
        (TS.replace("@univariate true", "@univariate false"), "univariate"),
        (TS.replace("@data\n", ""), "no @data"),
        (TS.replace("3.0:a", "3.0:1.0:a"), "v_1,...,v_T:label"),
        (TS.replace("1.0,2.0,3.0:a", "1.0,2.0:a"), "different lengths"),
    ],
)
def test_parse_ts_refuses_what_it_cannot_read(text, match):
    with pytest.raises(ValueError, match=match):
        ucr.parse_ts(text)


def test_load_ucr_gunpoint_as_the_archive_describes_it():
    xtr, ytr, xte, yte = ucr.load("GunPoint")
    assert xtr.shape == (50, 150) and xte.shape == (150, 150)
    assert set(ytr.tolist()) == set(yte.tolist()) == {0, 1}
    np.testing.assert_allclose(xtr.mean(1), 0, atol=1e-12)
    np.testing.assert_allclose(xtr.std(1), 1, atol=1e-6)
    # labels follow the order of @classLabel ("1 2"): class "1" is 0
    text = (ucr.data_dir() / "GunPoint" / "GunPoint_TRAIN.ts").read_text()
    assert (ytr == 0).tolist() == [
        line.endswith(":1") for line in text.split("@data")[1].split()
    ]


def test_load_ucr_rejects_an_unknown_problem():
    with pytest.raises(ValueError, match="unknown UCR problem 'EigenWorms'"):
        ucr.load("EigenWorms")


def test_mnist1d_is_generated_offline_without_touching_global_seeds():
    np.random.seed(123)
    random.seed(123)
    expected = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    xtr, ytr, xte, yte = deq_models.load_mnist1d.__wrapped__()
    assert (np.random.rand(), random.random()) == expected
    assert xtr.shape == (4000, 40) and xte.shape == (1000, 40)
    assert xtr.dtype == np.float32 and ytr.dtype == np.int32
    assert set(ytr.tolist()) == set(range(10))
    # the package's own (seed 42) data: the same on every call
    np.testing.assert_array_equal(xtr, deq_models.load_mnist1d()[0])
