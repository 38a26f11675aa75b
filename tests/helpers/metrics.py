"""Reading the pooler's /metrics: the samples by family, and one sample's value."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def scrape(port: int) -> dict[str, list[Sample]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    families: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        # A gauge `x` and a counter `x_total` (PgDoorman exports such pairs) both parse
        # as family `x`: keep the samples of both.
        families.setdefault(family.name, []).extend(family.samples)
    return families


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample called `name` whose labels include `labels`."""
    found = [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]
