"""Builds the memory benchmark set (sessions.jsonl, questions.jsonl) deterministically.

A developer's notes from 24 weekly sessions on one project: one-off facts, attributes that change
twice (CI provider, owners, versions...), pairs of related notes in different sessions, recurring
failed attempts, and filler. Questions come in the five LongMemEval categories, each with the ids
of the episodes that answer it (and, for updates, the stale episodes that must not outrank them).

    python benchmarks/data/memory/build.py
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
START = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
SESSIONS = 24

# (note, question) — information extraction: one note answers it.
ONE_OFF = [
    ("The staging Redis instance listens on port 6390 instead of the default.", "Which port is the staging Redis on?"),
    ("Marta from the data team owns the nightly ETL job that loads the warehouse.", "Who is responsible for the nightly warehouse load?"),
    ("Our S3 bucket for build artifacts is called lighthouse-artifacts-eu.", "What is the name of the bucket where build artifacts go?"),
    ("The API rate limit for anonymous clients is 60 requests per minute.", "How many requests per minute may an anonymous API client make?"),
    ("The on-call rotation hands over every Tuesday at 09:00 Lisbon time.", "When does the on-call shift change hands?"),
    ("Feature flags are served by Unleash running in the platform cluster.", "What system serves our feature flags?"),
    ("The mobile app's minimum supported iOS version is iOS 16.", "What is the oldest iOS release the mobile app supports?"),
    ("Database backups are kept for 35 days in cold storage.", "How long are database backups retained?"),
    ("The design system's primary brand colour is #1F6FEB.", "What hex value is the brand's primary colour?"),
    ("Search queries time out after 800 milliseconds at the gateway.", "What is the gateway timeout for search requests?"),
    ("The load balancer health check hits /healthz every 10 seconds.", "Which path does the load balancer probe for health?"),
    ("Customer support tickets are triaged in the #support-triage Slack channel.", "Where are support tickets triaged?"),
    ("The billing service's webhook secret rotates every 90 days.", "How often is the billing webhook secret rotated?"),
    ("We sign release tags with the GPG key of the release-bot account.", "Whose key signs the release tags?"),
    ("The maximum upload size for attachments is 25 MB.", "How large can an attachment upload be?"),
    ("Jonas wrote the original tokenizer for the search indexer.", "Who originally wrote the search indexer's tokenizer?"),
    ("The staging environment is wiped and reseeded every Sunday night.", "When is staging reset?"),
    ("Error budgets are computed over a rolling 28-day window.", "Over what window do we compute error budgets?"),
    ("The GraphQL schema is published to the registry under the name lighthouse-core.", "Under what name is the GraphQL schema registered?"),
    ("Password reset links expire after 30 minutes.", "How long is a password reset link valid?"),
    ("The analytics events are batched and flushed every 5 seconds by the SDK.", "How frequently does the SDK flush analytics events?"),
    ("Our docs site is built with MkDocs Material and hosted on Netlify.", "Which tool builds the documentation site?"),
    ("Priya approved the budget for the second GPU node in the ML cluster.", "Who signed off on the extra GPU node?"),
    ("The legacy SOAP endpoint will be switched off on 30 September.", "When does the old SOAP endpoint get turned off?"),
]

# (subject, predicate, [three values], statement template, now-questions x2, then-question template)
CHANGING = [
    ("payments service", "CI provider", ["Jenkins", "GitHub Actions", "Buildkite"],
     "The payments service CI now runs on {v}.", ["Which CI system builds the payments service these days?", "Where do payments builds currently run?"],
     "Which CI system built the payments service on {d}?"),
    ("search indexer", "owner", ["Jonas", "Aiko", "Rafael"],
     "{v} is the owner of the search indexer from now on.", ["Who currently owns the search indexer?", "Who should I ask about the search indexer today?"],
     "Who owned the search indexer on {d}?"),
    ("primary database", "version", ["PostgreSQL 14", "PostgreSQL 15", "PostgreSQL 16"],
     "Upgraded the primary database; it is on {v} now.", ["What Postgres version is the primary database on now?", "Which version does our main database currently run?"],
     "What version was the primary database on {d}?"),
    ("web frontend", "framework", ["Create React App", "Vite", "Next.js"],
     "The web frontend was moved over to {v} this week.", ["What does the web frontend build with at the moment?", "Which framework is the frontend on now?"],
     "Which framework did the web frontend use on {d}?"),
    ("team standup", "time", ["9:30", "10:00", "9:15"],
     "Standup moves to {v} starting this week.", ["What time is standup now?", "When do we currently hold the daily standup?"],
     "What time was standup on {d}?"),
    ("error tracking", "tool", ["Sentry", "Rollbar", "Honeybadger"],
     "We now send error reports to {v}.", ["Which error tracker do we use currently?", "Where do exceptions get reported these days?"],
     "Which error tracker did we use on {d}?"),
    ("deploy cadence", "frequency", ["weekly", "twice a week", "daily"],
     "Deploys to production now happen {v}.", ["How often do we deploy to production now?", "What is the current production release cadence?"],
     "How often did we deploy to production on {d}?"),
    ("message queue", "technology", ["RabbitMQ", "Amazon SQS", "Kafka"],
     "The order events go through {v} now.", ["What message broker carries order events today?", "Which queue technology is in use now for order events?"],
     "What carried the order events on {d}?"),
    ("tech lead", "person", ["Sofia", "Daniel", "Mei"],
     "{v} has taken over as tech lead of the project.", ["Who is the tech lead right now?", "Who currently leads the project technically?"],
     "Who was the tech lead on {d}?"),
    ("container registry", "host", ["Docker Hub", "GitHub Container Registry", "Amazon ECR"],
     "Images are pushed to {v} from now on.", ["Where do we push container images now?", "Which registry currently holds our images?"],
     "Which registry did we push images to on {d}?"),
    ("Python runtime", "version", ["Python 3.10", "Python 3.11", "Python 3.12"],
     "The services' base image now ships {v}.", ["Which Python version do the services run today?", "What Python is in the base image now?"],
     "Which Python version did the services run on {d}?"),
    ("staging cluster", "region", ["eu-west-1", "eu-central-1", "eu-south-2"],
     "Staging was relocated to the {v} region.", ["Which region hosts staging now?", "Where is the staging cluster currently located?"],
     "Which region hosted staging on {d}?"),
]

# (note A, note B, question) — multi-session: both notes needed.
PAIRS = [
    ("Migrated the billing service to gRPC for internal calls.", "The notifications service now also talks gRPC internally.", "Which services switched to gRPC for internal calls?"),
    ("Added rate limiting to the login endpoint after the credential-stuffing incident.", "Rate limiting is also enabled on the password reset endpoint now.", "Which endpoints got rate limiting?"),
    ("Rui joined the team as a backend engineer.", "Lena joined as our second backend engineer.", "Which backend engineers joined the team?"),
    ("The invoice PDF generator leaks memory under load; restarted it twice.", "The thumbnail worker also leaks memory and needs nightly restarts.", "Which components have memory leaks?"),
    ("Dropped support for Internet Explorer 11 in the customer portal.", "The admin console stopped supporting Safari 14.", "Which browsers did we drop support for?"),
    ("The analytics dashboard was rewritten in Svelte.", "The marketing site is also rewritten in Svelte now.", "What did we rewrite in Svelte?"),
    ("Enabled two-factor authentication for all GitHub org members.", "Two-factor authentication is now mandatory on the AWS console too.", "Where did we enforce two-factor authentication?"),
    ("Cut the Docker image of the API from 1.2 GB to 300 MB with a multi-stage build.", "The worker image went from 900 MB to 250 MB using the same multi-stage trick.", "Which images did the multi-stage build shrink, and by how much?"),
    ("Customer Acme reported slow CSV exports.", "Customer Globex also complained about slow CSV exports.", "Which customers complained about CSV export speed?"),
    ("The geocoding API costs us about 400 euros a month.", "The SMS provider bill is roughly 650 euros a month.", "What do the geocoding API and the SMS provider cost per month?"),
    ("We adopted Ruff as the Python linter.", "Ruff's formatter replaced Black in the pre-commit hooks.", "What changes did we make to Python linting and formatting?"),
    ("Load test: checkout handles 1,200 requests per second before p99 exceeds 1 s.", "Load test: search handles 3,000 requests per second at p99 under 300 ms.", "What throughput did the checkout and search load tests reach?"),
    ("The quarterly security review is owned by Ines.", "The yearly penetration test is booked with an outside firm, Bastion Labs.", "Who handles security reviews and penetration testing?"),
    ("Moved the cron jobs for invoices into Temporal workflows.", "The data retention purge now runs as a Temporal workflow as well.", "Which jobs were moved into Temporal workflows?"),
    ("Translations for German were added to the web app.", "The web app now also ships Japanese translations.", "Which languages were added to the web app's translations?"),
    ("The public status page is hosted on Statuspage.", "Incident postmortems are written in the Notion incidents database.", "Where do the status page and incident postmortems live?"),
    ("Hired a contractor, Tomasz, for the Android app.", "A second contractor, Bianca, joined for the iOS app.", "Which contractors did we bring on for the mobile apps?"),
    ("The recommendation model is retrained every Monday.", "The fraud model retraining runs on the first day of each month.", "How often are the recommendation and fraud models retrained?"),
    ("Turned on HTTP/3 at the CDN for the marketing site.", "HTTP/3 is now enabled for the API edge as well.", "Where did we turn on HTTP/3?"),
    ("The office move to the new building is planned for March.", "The new building has a server room that we will not use; everything stays in the cloud.", "What do we know about the office move and the new building?"),
]

ABSTAIN = [
    "Which port does the production Memcached cluster listen on?",
    "Who owns the Kubernetes ingress controller?",
    "What is the name of the bucket for database snapshots in the US region?",
    "What is the rate limit for authenticated partner integrations?",
    "Which PagerDuty escalation policy covers the data platform?",
    "What is the minimum supported Android version of the mobile app?",
    "How long are application logs retained in Elasticsearch?",
    "What font does the design system use for headings?",
    "What is the timeout for the recommendations API?",
    "Which Terraform version do we pin in the infrastructure repo?",
    "Which Slack channel is used for release announcements?",
    "How often is the TLS certificate for the API renewed?",
    "Who approved the contract with the translation agency?",
    "What is the maximum video upload length?",
    "Who wrote the original billing reconciliation script?",
    "When is the data warehouse vacuumed?",
    "What is our SLO for checkout availability?",
    "Which GraphQL client library does the iOS app use?",
    "How long does an email verification link stay valid?",
    "Which vendor supplies our office laptops?",
    "What is the budget for the conference travel this year?",
    "Which Grafana dashboard tracks queue depth?",
    "When will the FTP server be decommissioned?",
    "Who is the product manager for the mobile apps?",
]

# Recurring dead ends and fixes: attempts spread over many sessions (consolidation fodder).
ATTEMPTS = [
    "Tried bumping the pytest-xdist worker count to fix the flaky integration suite; it still failed intermittently.",
    "Retried the flaky integration suite with more xdist workers; still failing intermittently.",
    "Clearing the Gradle cache did not fix the Android build error; it failed again.",
    "Wiped the Gradle cache once more; the Android build still fails with the same error.",
    "Pinning urllib3 below 2 fixed the requests SSL error in the scripts container; tests passed.",
    "Pinned urllib3<2 in the tools image as well and the SSL error was resolved.",
]

FILLER = [
    "Lunch was late today because of the fire drill.",
    "Reviewed three pull requests before noon.",
    "The coffee machine on floor two is broken again.",
    "Spent the afternoon reading the incident report from last week.",
    "Paired with a colleague on code review etiquette.",
    "Cleaned up old branches in the main repository.",
    "Updated my laptop and restarted twice.",
    "The planning meeting ran over by twenty minutes.",
    "Wrote notes for the next retrospective.",
    "Answered questions from the new intern about the codebase layout.",
    "Read an article about structured concurrency.",
    "Renamed a few confusing variables in the utils module.",
    "Walked through the onboarding checklist with HR.",
    "Sorted my inbox and archived old newsletters.",
    "Tidied the README's setup section.",
    "Took a long call about quarterly goals.",
    "Listened to a podcast about distributed tracing during the commute.",
    "Filed an expense report for the team dinner.",
    "Updated the team calendar with holidays.",
    "Fixed a typo in the changelog.",
]


def when(session: int, minute: int) -> str:
    return (START + timedelta(days=7 * session, minutes=minute)).isoformat().replace("+00:00", "Z")


def month_of(ts: datetime) -> str:
    return f"{ts.day} {ts.strftime('%B %Y')}"


def build() -> tuple[list[dict], list[dict]]:
    notes: dict[int, list[dict]] = {s: [] for s in range(SESSIONS)}
    questions: list[dict] = []
    counter = 0

    def note(session: int, text: str, kind: str = "observation", facts: list[dict] | None = None) -> str:
        nonlocal counter
        counter += 1
        nid = f"e{counter:04d}"
        notes[session].append({"id": nid, "text": text, "kind": kind, "facts": facts or []})
        return nid

    for i, (text, q) in enumerate(ONE_OFF):
        nid = note(i % SESSIONS, text)
        questions.append({"id": f"ie{i:02d}", "category": "information_extraction", "question": q, "evidence": [nid]})

    for j, (subject, predicate, values, template, now_qs, then_q) in enumerate(CHANGING):
        sessions = [j % 6, 8 + j % 6, 16 + j % 6]
        ids = [
            note(s, template.format(v=v), "fact", [{"subject": subject, "predicate": predicate, "object": v}])
            for s, v in zip(sessions, values, strict=True)
        ]
        for n, q in enumerate(now_qs):
            questions.append({"id": f"ku{j:02d}{n}", "category": "knowledge_update", "question": q, "evidence": [ids[2]], "stale": ids[:2]})
        for n in range(2):
            # Halfway between the value's own session and the next change.
            mid = START + timedelta(days=7 * (sessions[n] + sessions[n + 1]) / 2)
            questions.append({
                "id": f"tr{j:02d}{n}", "category": "temporal_reasoning", "question": then_q.format(d=month_of(mid)),
                "as_of": mid.isoformat().replace("+00:00", "Z"), "evidence": [ids[n]], "stale": [x for x in ids if x != ids[n]],
            })

    for k, (a, b, q) in enumerate(PAIRS):
        sa, sb = k % 12, 12 + (k * 5) % 12
        questions.append({"id": f"ms{k:02d}", "category": "multi_session", "question": q, "evidence": [note(sa, a), note(sb, b)]})

    for n, q in enumerate(ABSTAIN):
        questions.append({"id": f"ab{n:02d}", "category": "abstention", "question": q, "evidence": []})

    for s in range(SESSIONS):
        for n in range(5):
            note(s, FILLER[(s * 5 + n) % len(FILLER)] + ("" if s < len(FILLER) // 5 else f" (week {s + 1})"))
        note(s, ATTEMPTS[s % len(ATTEMPTS)], "attempt" if "fixed" not in ATTEMPTS[s % len(ATTEMPTS)] and "resolved" not in ATTEMPTS[s % len(ATTEMPTS)] else "outcome")

    sessions_out = []
    for s in range(SESSIONS):
        episodes = []
        for minute, item in enumerate(notes[s]):
            episodes.append({**item, "at": when(s, minute)})
        sessions_out.append({"session": f"s{s:02d}", "started": when(s, 0), "episodes": episodes})
    return sessions_out, questions


def main() -> None:
    sessions, questions = build()
    (HERE / "sessions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sessions), encoding="utf-8")
    (HERE / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    counts: dict[str, int] = {}
    for q in questions:
        counts[q["category"]] = counts.get(q["category"], 0) + 1
    print(f"{len(sessions)} sessions, {sum(len(s['episodes']) for s in sessions)} episodes, {len(questions)} questions: {counts}")


if __name__ == "__main__":
    main()
