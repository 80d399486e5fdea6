# rq-dashboard for the `admin` compose profile: queues, jobs (with results and tracebacks), workers.
# headstart's jobs are JSON-serialized, so it must run with --json (compose passes it).
#   docker build -f docker/rq-dashboard.Dockerfile -t headstart-rq-dashboard .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# rq and redis pinned to the versions headstart's workers use (setup.cfg).
RUN pip install rq-dashboard==0.9.0 rq==3.0.0 redis==8.1.0 \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin dashboard
USER dashboard

EXPOSE 9181
CMD ["rq-dashboard", "--json"]
