FROM python:3.11-slim
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir -r requirements.lock
COPY gateway ./gateway
COPY adapters ./adapters
COPY config ./config
RUN pip install --no-cache-dir --no-deps . && useradd --system --uid 10001 gateway
USER gateway
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/live').status != 200)"
CMD ["ehr-gateway", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
