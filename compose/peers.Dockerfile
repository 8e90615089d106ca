# The development peers of the stack (SMTP sink, local Stripe API), from tests/peers.
# Build from the repository root: docker build -f compose/peers.Dockerfile -t celeriac-peers .
FROM python:3.11-slim
WORKDIR /peers
COPY tests/peers/requirements.txt tests/peers/requirements-stripe.txt ./
RUN pip install --no-cache-dir -r requirements.txt -r requirements-stripe.txt
COPY tests/peers/*.py tests/peers/*.json ./
USER nobody
