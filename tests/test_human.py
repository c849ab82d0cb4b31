"""What ctm prints for people: values without Python's reprs, sizes in binary units, module names in layer order
without their shared prefix."""

from __future__ import annotations

from ctm_cli import human
from ctm_cli.summary import common_prefix, natural_key, saved_modules


def test_values_as_people_write_them():
    assert [human.number(x) for x in (1.0, 500, 0.25, 1e-10, 1 / 3, True)] == [
        "1",
        "500",
        "0.25",
        "1e-10",
        "0.3333",
        "true",
    ]
    assert human.value({"lambda": 1.0, "density": 0.2}) == "lambda=1, density=0.2"
    assert human.value(["float32"]) == "float32" and human.value([2.0, 0.5]) == "2, 0.5"
    assert human.value({}) == human.value([]) == human.value(None) == "none"
    assert [human.size(n) for n in (0, 1023, 1024, 2_364_389, 3 * 1024**3)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "2.3 MiB",
        "3.0 GiB",
    ]
    assert human.count(1234567) == "1,234,567"


def test_module_names_in_layer_order_without_their_shared_prefix():
    names = [f"base_model.model.transformer.h.{i}.attn.c_attn" for i in (10, 2, 1, 0)]
    assert sorted(names, key=natural_key)[:3] == [names[3], names[2], names[1]]  # h.0, h.1, h.2 before h.10
    assert common_prefix(names) == "base_model.model.transformer.h."
    assert common_prefix(["a.b.x", "a.b.y"]) == "a.b." and common_prefix(["a.b.x", "a.b.x"]) == "a.b."
    assert common_prefix(["h.1.q", "h.10.q"]) == "h."  # whole components only


def test_saved_modules_are_what_the_file_holds():
    keys = [
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
        "base_model.model.score.weight",
        "base_model.model.head.modules_to_save.default.weight",
    ]
    assert saved_modules(keys) == ["classifier", "head", "score"]
