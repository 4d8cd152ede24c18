# A stand-in for the official Redis image where no registry can be pulled from (CI here): Debian's
# redis-server on the local base, as uid 999 with /data its own, like the official image compose names.
ARG BASE=faceset-base:bookworm
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o 999 -g 999 /data
USER 999:999
WORKDIR /data
VOLUME ["/data"]
EXPOSE 6379
CMD ["redis-server"]
