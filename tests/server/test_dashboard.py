"""The chart's Grafana dashboard fills: every metric its panels query is one a real server exports (after a
few requests, so that every labelled series exists), with the `model_name` label its variable selects by
(and vLLM V1's `engine`)."""

import json
import pathlib
import re
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = pathlib.Path(__file__).parents[2] / "charts" / "nanoserve" / "dashboards" / "nanoserve.json"


def test_every_panel_queries_exported_metrics(tiny_server):
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)
    for _ in range(2):
        client.completions.create(model="tiny", prompt=list(range(40, 80)), max_tokens=4)
    with urllib.request.urlopen(f"{tiny_server.url}/metrics") as r:
        exported = {s.name: s.labels for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["query"]["query"])
    queried = {name for e in exprs for name in re.findall(r"vllm:[a-z0-9_]+", e)}
    assert len(dashboard["panels"]) >= 11 and len(queried) >= 14
    for name in queried:
        assert name in exported, name
        assert exported[name].get("model_name") == "tiny" and exported[name].get("engine") == "0", name
