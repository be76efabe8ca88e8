"""Writes the CRAG benchmark corpora and questions from the facts below (run once; outputs are committed).

local/*.md   the internal knowledge, indexed in the wiki's layout
web/*.html   the "web", served by the loopback SearXNG-compatible server
questions.json  >= 100 questions: answerable locally, only from the web, or from neither
"""

from __future__ import annotations

import html
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# topic -> (title, intro, [(section, [(fact sentence, question, gold evidence)], [filler sentences])])
LOCAL = {
    "kestrel-gateway": ("Kestrel API gateway", "Kestrel is the API gateway in front of every public service of the platform.", [
        ("Limits", [
            ("Kestrel rejects request bodies larger than 12 MB with status 413.", "What is the largest request body the Kestrel gateway accepts?", "12 MB"),
            ("Each API key may send 600 requests per minute before Kestrel starts answering 429.", "How many requests per minute may one API key send through Kestrel?", "600 requests per minute"),
        ], ["Limits are reviewed every quarter by the platform team.", "Internal services are not subject to these limits."]),
        ("Routing", [
            ("Kestrel reloads its route table from the routes.yaml file every 30 seconds.", "How often does Kestrel reload its route table?", "every 30 seconds"),
            ("Requests that match no route are answered by the fallback service named lantern.", "Which service answers requests that match no Kestrel route?", "lantern"),
        ], ["Routes are grouped by team ownership.", "The route table is kept in the platform repository."]),
        ("Timeouts", [
            ("Kestrel gives each upstream call 8 seconds before it returns a 504 to the client.", "How long does Kestrel wait for an upstream before returning 504?", "8 seconds"),
        ], ["Clients should retry idempotent calls after a timeout."]),
    ]),
    "marten-queue": ("Marten job queue", "Marten is the job queue that runs background work for billing and reporting.", [
        ("Retries", [
            ("Marten retries a failed job seven times with exponential backoff starting at three seconds.", "How many times does Marten retry a failed job?", "seven times"),
            ("After the last retry Marten moves the job to the graveyard table for manual review.", "Where does Marten put a job after its last retry fails?", "graveyard table"),
        ], ["Retry counts are visible on the Marten dashboard.", "Billing jobs are idempotent by design."]),
        ("Workers", [
            ("Each Marten worker runs four jobs at a time by default, set with the concurrency option.", "How many jobs does a Marten worker run at once by default?", "four jobs at a time"),
            ("Marten workers send a heartbeat every 15 seconds and a job is reassigned after three missed heartbeats.", "When is a Marten job reassigned to another worker?", "three missed heartbeats"),
        ], ["Workers run in the batch node pool.", "Worker logs are shipped to the central log store."]),
        ("Scheduling", [
            ("Scheduled Marten jobs use cron syntax evaluated in UTC.", "In which time zone are scheduled Marten jobs evaluated?", "UTC"),
        ], ["The schedule file is reviewed like code."]),
    ]),
    "otter-storage": ("Otter object storage", "Otter is the internal object store for build artifacts, backups and user uploads.", [
        ("Durability", [
            ("Otter keeps three replicas of every object across two availability zones.", "How many replicas of each object does Otter keep?", "three replicas"),
            ("A background scrubber re-reads every Otter object once every 21 days to detect bit rot.", "How often does the Otter scrubber re-read each object?", "every 21 days"),
        ], ["Durability targets are set by the storage team.", "Replica placement is automatic."]),
        ("Lifecycle", [
            ("Build artifacts in Otter expire after 45 days unless they are tagged as a release.", "When do build artifacts expire in Otter?", "45 days"),
            ("Deleted Otter objects stay recoverable in the trash bucket for 7 days.", "How long can a deleted Otter object be recovered?", "7 days"),
        ], ["Lifecycle rules apply per bucket.", "Uploads larger than a few gigabytes use multipart upload."]),
        ("Access", [
            ("Otter presigned download links are valid for 15 minutes.", "How long is an Otter presigned download link valid?", "15 minutes"),
        ], ["Access is granted through service accounts."]),
    ]),
    "plover-deploy": ("Plover deployment pipeline", "Plover is the deployment pipeline that ships every service to production.", [
        ("Release windows", [
            ("Plover deploys to production only on weekdays between 09:00 and 16:00 Berlin time.", "When does Plover deploy to production?", "between 09:00 and 16:00"),
            ("A release must soak in staging for two hours before Plover promotes it.", "How long must a release soak in staging before Plover promotes it?", "two hours"),
        ], ["Emergency fixes follow the incident process instead.", "Release notes are generated from commit messages."]),
        ("Rollbacks", [
            ("Plover rolls back automatically when the error rate doubles within ten minutes of a deploy.", "When does Plover roll back a deploy automatically?", "error rate doubles"),
            ("Plover keeps the last five container images of each service for manual rollbacks.", "How many container images per service does Plover keep for rollbacks?", "last five container images"),
        ], ["Rollbacks are announced in the deploy channel.", "Database migrations are never rolled back automatically."]),
        ("Canary", [
            ("Plover sends 5 percent of traffic to the canary for the first twenty minutes.", "What share of traffic goes to a Plover canary?", "5 percent"),
        ], ["Canary metrics appear on the release dashboard."]),
    ]),
    "quail-auth": ("Quail authentication service", "Quail issues and checks the tokens every internal service uses.", [
        ("Tokens", [
            ("Quail access tokens expire after 20 minutes and refresh tokens after 30 days.", "How long does a Quail access token live?", "20 minutes"),
            ("Quail signs tokens with Ed25519 keys that rotate every 90 days.", "How often does Quail rotate its signing keys?", "every 90 days"),
        ], ["Token formats are documented in the API reference.", "Clients must not parse token contents."]),
        ("Sessions", [
            ("Quail ends a browser session after 8 hours of inactivity.", "After how much inactivity does Quail end a browser session?", "8 hours"),
            ("Five failed sign-ins within ten minutes lock a Quail account for 30 minutes.", "What locks a Quail account?", "Five failed sign-ins"),
        ], ["Session cookies are marked secure and HTTP-only.", "Support can unlock accounts on request."]),
        ("Service accounts", [
            ("Quail service account secrets are stored in the vault under the path quail/sa.", "Where are Quail service account secrets stored?", "quail/sa"),
        ], ["Service accounts are created through a pull request."]),
    ]),
    "raven-metrics": ("Raven metrics pipeline", "Raven collects metrics from every host and service and stores them for dashboards and alerts.", [
        ("Collection", [
            ("The Raven agent scrapes each target every 20 seconds.", "How often does the Raven agent scrape its targets?", "every 20 seconds"),
            ("Raven drops any series with more than 40 labels to protect the store.", "Which series does Raven drop?", "more than 40 labels"),
        ], ["The agent runs on every host as a system service.", "Targets register themselves through service discovery."]),
        ("Retention", [
            ("Raven keeps raw samples for 15 days and five-minute rollups for 13 months.", "How long does Raven keep raw samples?", "15 days"),
            ("Raven downsampling runs at 02:00 UTC every night.", "When does Raven downsampling run?", "02:00 UTC"),
        ], ["Retention is the same for every team.", "Long-term storage uses Otter buckets."]),
        ("Alerting", [
            ("Raven pages the on-call engineer only after an alert has fired for five consecutive minutes.", "When does Raven page the on-call engineer?", "five consecutive minutes"),
        ], ["Alert rules live next to the service code."]),
    ]),
    "sparrow-search": ("Sparrow search service", "Sparrow is the full-text search service behind the product search box.", [
        ("Indexing", [
            ("Sparrow rebuilds its product index every night at 03:30 UTC.", "When does Sparrow rebuild its product index?", "03:30 UTC"),
            ("New products become searchable in Sparrow within 90 seconds through the change stream.", "How quickly do new products become searchable in Sparrow?", "within 90 seconds"),
        ], ["Index schema changes need a full rebuild.", "The indexer is written in Go."]),
        ("Ranking", [
            ("Sparrow boosts exact title matches by a factor of 3.", "How much does Sparrow boost exact title matches?", "factor of 3"),
            ("Sparrow hides products that have been out of stock for more than 60 days.", "Which products does Sparrow hide from results?", "out of stock for more than 60 days"),
        ], ["Ranking experiments run behind feature flags.", "Search quality is reviewed monthly."]),
        ("Capacity", [
            ("Sparrow serves at most 2,000 queries per second per node.", "How many queries per second can one Sparrow node serve?", "2,000 queries per second"),
        ], ["Nodes scale out automatically."]),
    ]),
    "tern-cache": ("Tern edge cache", "Tern is the edge cache that serves static assets and cacheable API responses.", [
        ("Expiry", [
            ("Tern caches static assets for 7 days and API responses for 60 seconds by default.", "How long does Tern cache API responses by default?", "60 seconds"),
            ("A purge request removes an object from every Tern edge within 30 seconds.", "How fast does a Tern purge reach every edge?", "within 30 seconds"),
        ], ["Cache keys include the request path and query string.", "Assets carry content hashes in their names."]),
        ("Origin", [
            ("Tern shields the origin with a single mid-tier cache in Frankfurt.", "Where is Tern's mid-tier cache?", "Frankfurt"),
            ("When the origin is down Tern serves stale content for up to 24 hours.", "How long does Tern serve stale content when the origin is down?", "24 hours"),
        ], ["Origin health is checked continuously.", "The origin pool is managed by the platform team."]),
    ]),
}

WEB = {
    "heron-db": ("Heron DB operations guide", [
        ("Heron DB compacts its write-ahead log every 6 hours by default.", "How often does Heron DB compact its write-ahead log?", "every 6 hours"),
        ("Heron DB followers lag the leader by at most one sealed segment.", "How far can a Heron DB follower lag behind the leader?", "one sealed segment"),
        ("The default Heron DB port is 7171.", "What is the default port of Heron DB?", "7171"),
        ("Heron DB stores timestamps with microsecond precision.", "What timestamp precision does Heron DB use?", "microsecond precision"),
    ], ["Heron DB is an embedded time-series database written in Rust.", "The project has a friendly community forum.", "Release notes are published on the project blog."]),
    "ibis-ci": ("Ibis CI documentation", [
        ("Ibis CI cancels a job that prints no output for 25 minutes.", "When does Ibis CI cancel a silent job?", "25 minutes"),
        ("Ibis CI caches dependency folders for 14 days per branch.", "How long does Ibis CI keep dependency caches?", "14 days"),
        ("Free Ibis CI accounts get 2,500 build minutes per month.", "How many build minutes do free Ibis CI accounts get?", "2,500 build minutes"),
        ("Ibis CI pipelines are defined in a file named ibis.yml at the repository root.", "What file defines an Ibis CI pipeline?", "ibis.yml"),
    ], ["Ibis CI supports Linux and macOS runners.", "Pipelines can be triggered by tags.", "The dashboard shows build history."]),
    "jackal-orm": ("Jackal ORM handbook", [
        ("Jackal ORM opens at most 10 pooled connections per process unless pool_size is set.", "How many pooled connections does Jackal ORM open by default?", "10 pooled connections"),
        ("Jackal ORM loads relationships lazily unless a query calls prefetch.", "How does Jackal ORM load relationships by default?", "lazily"),
        ("Jackal ORM migrations are stored as numbered SQL files in the migrations folder.", "How does Jackal ORM store migrations?", "numbered SQL files"),
        ("Jackal ORM raises StaleRowError when an optimistic lock version does not match.", "What error does Jackal ORM raise on an optimistic lock conflict?", "StaleRowError"),
    ], ["Jackal ORM supports PostgreSQL and SQLite.", "Models are plain Python classes.", "The handbook is updated with each release."]),
    "koala-proxy": ("Koala reverse proxy manual", [
        ("Koala proxy closes idle keep-alive connections after 75 seconds.", "When does the Koala proxy close idle keep-alive connections?", "75 seconds"),
        ("Koala proxy buffers request bodies up to 64 KB in memory before spilling to disk.", "How much of a request body does Koala buffer in memory?", "64 KB"),
        ("Koala proxy reloads its configuration on SIGHUP without dropping connections.", "How do you reload the Koala proxy configuration?", "SIGHUP"),
        ("Koala proxy writes access logs in JSON lines by default.", "What format are Koala proxy access logs in?", "JSON lines"),
    ], ["Koala runs on Linux and BSD.", "Modules extend Koala with new directives.", "The manual covers version 3."]),
    "lynx-scheduler": ("Lynx cluster scheduler guide", [
        ("Lynx reserves 5 percent of each node's memory for system daemons.", "How much node memory does the Lynx scheduler reserve for system daemons?", "5 percent"),
        ("Lynx evicts the lowest-priority task first when a node runs out of memory.", "Which task does Lynx evict first when memory runs out?", "lowest-priority task"),
        ("Lynx spreads replicas of one service across at least two racks.", "Across how many racks does Lynx spread a service's replicas?", "two racks"),
        ("The Lynx scheduler makes a placement decision every 500 milliseconds.", "How often does the Lynx scheduler make placement decisions?", "500 milliseconds"),
    ], ["Lynx is used in large data centers.", "Operators interact with Lynx through a command-line tool.", "The guide has a glossary."]),
    "moth-vpn": ("Moth VPN administrator notes", [
        ("Moth VPN renegotiates session keys every 2 minutes.", "How often does Moth VPN renegotiate session keys?", "every 2 minutes"),
        ("Moth VPN listens on UDP port 51900 by default.", "Which port does Moth VPN listen on?", "51900"),
        ("Moth VPN disconnects a peer after 180 seconds without a handshake.", "When does Moth VPN disconnect a silent peer?", "180 seconds"),
    ], ["Moth VPN has clients for every major desktop system.", "Peers are identified by public keys.", "Administrators manage peers in a web console."]),
    "newt-flags": ("Newt feature flags reference", [
        ("Newt evaluates feature flags locally and refreshes rules from the server every 30 seconds.", "How often does Newt refresh its feature flag rules?", "every 30 seconds"),
        ("Newt percentage rollouts hash the user id with MurmurHash3.", "Which hash does Newt use for percentage rollouts?", "MurmurHash3"),
        ("Newt archives flags that have not been evaluated for 90 days.", "When does Newt archive a flag?", "90 days"),
    ], ["Newt has SDKs for many languages.", "Flags can target user segments.", "The reference lists every API call."]),
    "oriole-mail": ("Oriole mail relay FAQ", [
        ("Oriole relay retries delivery to a deferring server for up to 5 days.", "How long does the Oriole relay retry a deferred delivery?", "5 days"),
        ("Oriole relay rejects messages larger than 35 MB.", "What is the largest message the Oriole relay accepts?", "35 MB"),
        ("Oriole relay signs outgoing mail with DKIM using 2048-bit RSA keys.", "What key size does Oriole use for DKIM signatures?", "2048-bit"),
    ], ["Oriole relay is popular with small hosting companies.", "Bounce messages are sent to the envelope sender.", "The FAQ is maintained by volunteers."]),
    "pelican-backup": ("Pelican backup tool guide", [
        ("Pelican deduplicates backups in variable-size chunks averaging 1 MB.", "What chunk size does Pelican use for deduplication?", "averaging 1 MB"),
        ("Pelican encrypts every chunk with AES-256-GCM before upload.", "Which cipher does Pelican use to encrypt backups?", "AES-256-GCM"),
        ("Pelican's prune command keeps 7 daily, 4 weekly and 12 monthly snapshots by default.", "Which snapshots does Pelican prune keep by default?", "7 daily, 4 weekly and 12 monthly"),
    ], ["Pelican works with many storage backends.", "Restores can mount a snapshot as a folder.", "The guide starts with installation."]),
    "quokka-lint": ("Quokka linter rules", [
        ("Quokka limits functions to a cyclomatic complexity of 12 by default.", "What cyclomatic complexity does Quokka allow by default?", "complexity of 12"),
        ("Quokka reads its settings from a quokka.toml file.", "Which file holds Quokka settings?", "quokka.toml"),
        ("Quokka rule Q204 forbids mutable default arguments.", "Which Quokka rule forbids mutable default arguments?", "Q204"),
    ], ["Quokka can fix some problems automatically.", "Rules are grouped by category.", "The rule list grows with every release."]),
}

# Pages that match common words but answer nothing: the web is noisy.
WEB_NOISE = {
    "gardening-tips": ("Gardening tips for spring", "Spring is the best time to plant tomatoes. Water the beds every morning. Compost improves the soil for months. Pruning roses in late winter helps them bloom."),
    "travel-berlin": ("A weekend in Berlin", "Berlin has many museums and parks. The trains run every few minutes. Summer days are long and the cafes stay open late."),
    "coffee-brewing": ("Coffee brewing guide", "Use water just below boiling. A pour-over takes about three minutes. Grind size controls how fast the water flows through the coffee."),
    "marathon-training": ("Marathon training plan", "A beginner plan lasts sixteen weeks. Long runs grow by a mile every week. Rest days matter as much as training days."),
}

NEITHER = [
    "What is the maximum number of tenants a Kestrel gateway cluster supports?",
    "Which programming language is the Marten job queue written in?",
    "What compression algorithm does Otter use for stored objects?",
    "Who approves emergency deploys in Plover?",
    "Does Quail support hardware security keys for sign-in?",
    "What is the price of a Raven enterprise license?",
    "Which languages does the Sparrow stemmer support?",
    "How many edge locations does Tern run in Asia?",
    "What is the default replication factor of Heron DB clusters in the cloud edition?",
    "Which GPU types can Ibis CI runners use?",
    "Does Jackal ORM support MySQL spatial types?",
    "What is the HTTP/3 support status of the Koala proxy?",
    "How does Lynx handle GPU fractional sharing?",
    "Which mobile platforms have a Moth VPN client?",
    "What is the boiling point of liquid nitrogen at sea level?",
    "Who painted the ceiling of the Sistine Chapel?",
    "How many moons does Neptune have?",
    "What is the population of Reykjavik?",
    "Which year did the first transatlantic telegraph cable open?",
    "What is the recommended tire pressure for a road bicycle?",
    "How long should you boil an egg for a soft yolk?",
    "What is the airspeed of an unladen swallow?",
    "Which chess opening begins with the move e4 c5?",
    "What is the tallest mountain in Africa?",
    "How many keys does a standard piano have?",
    "What is the half-life of carbon-14?",
    "What availability does the Otter storage service promise in its SLA?",
    "Does the Tern edge cache support HTTP/3?",
    "What is the largest rule a Newt feature flag can hold?",
    "Which database does the Pelican backup tool use for its index?",
]


def write() -> None:
    (HERE / "local").mkdir(exist_ok=True)
    (HERE / "web").mkdir(exist_ok=True)
    questions = []
    for slug, (title, intro, sections) in LOCAL.items():
        parts = [f"# {title}", intro]
        for section, facts, filler in sections:
            sentences = [f for f, _, _ in facts]
            # Filler between facts so a whole chunk holds noise as well as the evidence.
            mixed = []
            for i, s in enumerate(sentences):
                mixed.append(s)
                if i < len(filler):
                    mixed.append(filler[i])
            mixed += filler[len(sentences):]
            parts += [f"## {section}", " ".join(mixed)]
            for fact, question, gold in facts:
                assert gold in fact, (gold, fact)
                questions.append({"question": question, "kind": "local", "gold": gold, "source": slug})
        (HERE / "local" / f"{slug}.md").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    for slug, (title, facts, filler) in WEB.items():
        paragraphs = [f[0] for f in facts]
        body = []
        for i, p in enumerate(paragraphs):
            body.append(f"<p>{html.escape(p)} {html.escape(filler[i % len(filler)])}</p>")
        page = (
            f"<!doctype html>\n<html><head><title>{html.escape(title)}</title>"
            "<style>body{max-width:40em}</style><script>window.analytics=[];</script></head>\n"
            f"<body><nav>Home | Docs | Community</nav>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(body) +
            "\n<footer>Copyright the authors. Licensed under CC BY 4.0.</footer></body></html>\n"
        )
        (HERE / "web" / f"{slug}.html").write_text(page, encoding="utf-8")
        for fact, question, gold in facts:
            assert gold in fact, (gold, fact)
            questions.append({"question": question, "kind": "web", "gold": gold, "source": slug})
    for slug, (title, text) in WEB_NOISE.items():
        (HERE / "web" / f"{slug}.html").write_text(
            f"<!doctype html>\n<html><head><title>{title}</title></head><body><h1>{title}</h1><p>{text}</p></body></html>\n", encoding="utf-8"
        )
    for question in NEITHER:
        questions.append({"question": question, "kind": "neither", "gold": None, "source": None})
    (HERE / "questions.json").write_text(json.dumps(questions, indent=1) + "\n", encoding="utf-8")
    counts = {k: sum(q["kind"] == k for q in questions) for k in ("local", "web", "neither")}
    print(f"{len(questions)} questions: {counts}")


if __name__ == "__main__":
    write()
