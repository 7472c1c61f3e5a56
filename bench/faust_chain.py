"""A Faust worker with the pipeline's topics and hops, whose agents only forward bytes.

`pipeline_throughput.py` runs it as the Faust ceiling: the rate that the worker's
topology reaches on faust-streaming and aiokafka when no agent does any work. It
is configured from the same `AUTOPULL_*` variables as `autopull worker` and builds
its Faust app with the worker's own settings (acknowledgements from every replica,
fetch and request sizes, session timeouts). Each record takes the hops of one
alert through the worker:

normalize  alerts.raw -> alerts.normalized
enrich     alerts.normalized -> alerts.enriched
group      alerts.enriched -> alerts.grouped
link       alerts.grouped -> incident.events, and one alerts.by_mailbox record per
           recipient (the count comes in the bench-recipients header)
exposure   alerts.by_mailbox, consumed
incident   incident.events -> incidents
trace      incidents, consumed

No agent decodes, encodes or keeps a table, so the pipeline's tables and their
changelogs are left out: the ceiling is an upper bound on the worker's rate.

Run: AUTOPULL_KAFKA_BOOTSTRAP=... .venv/bin/python bench/faust_chain.py
"""

from __future__ import annotations

import faust
from faust.types import StreamT
from faust.web import Request, Response, View

from autopull.streams.app import Pipeline
from autopull.streams.settings import Settings
from autopull.streams.topics import full_name

RECIPIENTS_HEADER = "bench-recipients"


def build_app(settings: Settings) -> faust.App:
    """Return a Faust app with the worker's settings and forwarding agents."""
    app = Pipeline._create_app(settings)
    topics = {
        name: app.topic(
            full_name(settings, name),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.topic_partitions,
        )
        for name in (
            "alerts.raw",
            "alerts.normalized",
            "alerts.enriched",
            "alerts.grouped",
            "alerts.by_mailbox",
            "incident.events",
            "incidents",
        )
    }

    def forward(source: str, target: str) -> None:
        async def hop(stream: StreamT) -> None:
            async for event in stream.events():
                await topics[target].send(key=event.key, value=event.value)

        app.agent(topics[source], name=source.replace(".", "_"))(hop)

    def consume(source: str) -> None:
        async def hop(stream: StreamT) -> None:
            async for _ in stream.events():
                pass

        app.agent(topics[source], name=source.replace(".", "_"))(hop)

    async def link(stream: StreamT) -> None:
        async for event in stream.events():
            await topics["incident.events"].send(key=event.key, value=event.value)
            recipients = int(event.headers.get(RECIPIENTS_HEADER, b"1"))
            for index in range(recipients):
                key = event.key + str(index).encode()
                await topics["alerts.by_mailbox"].send(key=key, value=event.value)

    forward("alerts.raw", "alerts.normalized")
    forward("alerts.normalized", "alerts.enriched")
    forward("alerts.enriched", "alerts.grouped")
    app.agent(topics["alerts.grouped"], name="alerts_grouped")(link)
    consume("alerts.by_mailbox")
    forward("incident.events", "incidents")
    consume("incidents")

    @app.page("/readyz")
    class Ready(View):
        async def get(self, request: Request) -> Response:
            # The worker's readiness without its tables: recovery has finished.
            ready = app.tables.recovery.completed.is_set()
            return self.json({"ready": ready}, status=200 if ready else 503)

    return app


def main() -> None:
    settings = Settings()
    (settings.data_dir / settings.faust_id).mkdir(parents=True, exist_ok=True)
    app = build_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.lower())
    # The same as the worker: no terminal spinner, which would set the root
    # logger to DEBUG at WARNING.
    worker.spinner = None
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
