"""Reading `/metrics` as Prometheus does: parsed by `prometheus_client`'s own parser."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass
class Scrape:
    families: dict[str, Metric]

    @property
    def samples(self) -> list[Sample]:
        return [s for family in self.families.values() for s in family.samples]

    def find(self, name: str, **labels: str) -> list[Sample]:
        """The samples named `name` whose labels include `labels`."""
        return [s for s in self.samples if s.name == name and labels.items() <= s.labels.items()]

    def value(self, name: str, **labels: str) -> float:
        """The one sample named `name` whose labels include `labels`."""
        found = self.find(name, **labels)
        assert len(found) == 1, (name, labels, found)
        return found[0].value

    def kind(self, family: str) -> str:
        return self.families[family].type


def scrape(text: str) -> Scrape:
    return Scrape({family.name: family for family in text_string_to_metric_families(text)})
