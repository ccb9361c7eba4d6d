"""The Buildkite source: agent API client, log streaming, job translation and the workers."""
