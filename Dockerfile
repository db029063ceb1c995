# remote-kernel-gateway. Offline builds: `--build-arg BASE=<a local image with python3 and
# python3-venv>` and a `wheels/` folder in the context (`pip wheel -w wheels .`); online, the
# defaults work as they are.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# tini reaps the kernel processes the gateway starts and forwards SIGTERM to it.
RUN command -v tini >/dev/null || { apt-get update \
      && apt-get install -y --no-install-recommends tini \
      && rm -rf /var/lib/apt/lists/*; }

# Only what the install needs (the optional wheels/ folder's wheels land in /src): never
# `COPY . /src`, which puts whatever lies in the checkout (.env and its token) into a layer
# that the `rm` below hides from containers but not from whoever has the image.
COPY pyproject.toml README.md wheel[s] /src/
COPY gateway /src/gateway
RUN python3 -m venv /opt/rkg \
    && if ls /src/*.whl >/dev/null 2>&1; then \
         /opt/rkg/bin/pip install --no-cache-dir --no-index --find-links /src \
           "remote-kernel-gateway[ssh,docker]"; \
       else \
         /opt/rkg/bin/pip install --no-cache-dir "/src[ssh,docker]"; \
       fi \
    && rm -rf /src \
    && useradd --create-home --uid 1000 rkg \
    && mkdir -p /data && chown rkg /data

USER rkg
WORKDIR /home/rkg
ENV PATH=/opt/rkg/bin:$PATH \
    RKG_IP=0.0.0.0 \
    RKG_PORT=8888 \
    RKG_STATE_DB=/data/state.sqlite \
    PYTHONUNBUFFERED=1
VOLUME /data
EXPOSE 8888

# The token comes from RKG_TOKEN or a file named by RKG_TOKEN_FILE (a docker secret).
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
  CMD python3 -c "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s%sapi' % (os.environ.get('RKG_PORT', '8888'), ('/' + os.environ.get('RKG_BASE_URL', '/').strip('/') + '/').replace('//', '/')), timeout=2)"

ENTRYPOINT ["tini", "--", "rkg", "serve"]
