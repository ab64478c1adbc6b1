"""Property-based fuzz of the service's OpenAPI schema (schemathesis) over real HTTP: no input the schema
allows, or that its negative tests derive, makes the service answer 5xx. Bounded: 10 cases per operation
in the fast suite, 200 in the slow one; short deadline."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from gallery_support import make_images, running_server, save_tiny_openclip  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from xbt.gallery.ingest import GalleryRetriever, ingest, items_from_folder  # noqa: E402
from xbt.gallery.store import Gallery  # noqa: E402
from xbt.specs import load_model  # noqa: E402
from xbt.serve.app import ServeConfig, create_app  # noqa: E402

TOKEN = "fuzz-token-123"


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = load_model(save_tiny_openclip(root / "model", seed=0))
    make_images(root / "photos", 4)
    gallery = Gallery.create(root / "gallery", model.space, modality="image")
    ingest(gallery, model, items_from_folder(root / "photos"))
    config = ServeConfig(token=TOKEN, max_k=10, max_upload_bytes=50_000, max_text_chars=100)
    with running_server(create_app(GalleryRetriever(gallery, model), config)) as url:
        yield url
    gallery.close()


def _fuzz_operation(operation, mode, url: str, examples: int) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=5000, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def run(case) -> None:
        # With the token, so that the writing endpoints are exercised beyond the auth check.
        response = case.call(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        case.validate_response(response, checks=[not_a_server_error])
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:200]}"

    run()


def _fuzz_all(url: str, mode: str, examples: int) -> int:
    """Every operation of the published schema with `examples` cases each; returns how many operations ran."""
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/search/text", "/search/image", "/items/text", "/items/image", "/thumbnail"}
    generation_mode = schemathesis.GenerationMode.POSITIVE if mode == "positive" else schemathesis.GenerationMode.NEGATIVE
    ran = 0
    for operation in operations:
        if mode == "negative" and not (len(operation.body) or len(operation.query)):
            continue  # no input to make invalid (GET /health, /info)
        _fuzz_operation(operation, generation_mode, url, examples=examples)
        ran += 1
    return ran


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_makes_the_service_fail(fuzz_service, mode):
    """Each operation of the published schema, with generated valid (positive) and invalid (negative) input.

    Driven through schemathesis' strategies and hypothesis directly (not schemathesis' pytest plugin,
    whose lazy fixture loader does not work with pytest 9.2)."""
    _fuzz_all(fuzz_service, mode, examples=10)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_makes_the_service_fail_200_cases_each(fuzz_service, mode):
    """The same with 200 cases per operation (the slow suite)."""
    print(f"\n{mode}: {_fuzz_all(fuzz_service, mode, examples=200)} operations x 200 cases")
