# The mesh-agent image: the node agent and the CA, one binary. Build the
# binary first (it carries its eBPF programs; the build needs the pinned
# nightly and bpf-linker, which stay out of the image), then the image
# from a context that holds only the binary:
#
#   cargo xtask build --release
#   mkdir -p image && cp "${CARGO_TARGET_DIR:-target}"/release/{mesh-agent,mesh-cni} image/
#   docker build -f Dockerfile -t REGISTRY/mesh-agent:TAG image/
#
# distroless/cc: glibc (the binary needs >= 2.34), libgcc_s and CA
# certificates; no shell, no package manager. The agent runs as root with
# the capabilities the DaemonSet names; the CA as an unprivileged user.
FROM gcr.io/distroless/cc-debian12
COPY mesh-agent /usr/local/bin/mesh-agent
# The CNI plugin: `mesh-agent cni install` copies it onto the node.
COPY mesh-cni /usr/local/bin/mesh-cni
ENTRYPOINT ["/usr/local/bin/mesh-agent"]
