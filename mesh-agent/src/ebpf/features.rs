//! Which kernel features each program needs, and the one line the agent
//! says when the running kernel lacks one.
//!
//! The kernel is asked, not guessed from its version: vendor kernels
//! (RHEL's 5.14, say) carry backports a version number does not show. A
//! program the kernel refuses is explained here from how it refused: a
//! verifier log naming an unknown helper (`unknown func bpf_x#N`, the
//! verifier's own words) points at that helper in that program type; a
//! load refused with EINVAL and no verifier log at all means the program
//! or attach type itself is unknown to the kernel. The versions are the
//! first mainline release with the feature (the README's "Kernels"
//! table, which says which were measured).

use std::fmt;

/// A kernel feature a program needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// What it is, as a kernel developer would name it.
    pub what: &'static str,
    /// The first mainline Linux release that has it.
    pub since: &'static str,
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (Linux {} or later)", self.what, self.since)
    }
}

/// The program or attach type each program is, by program name.
const PROGRAM_TYPES: [(&str, Feature); 8] = [
    (
        "mesh_connect4",
        Feature {
            what: "cgroup connect4 hooks",
            since: "4.17",
        },
    ),
    (
        "mesh_connect6",
        Feature {
            what: "cgroup connect6 hooks",
            since: "4.17",
        },
    ),
    (
        "mesh_getpeer4",
        Feature {
            what: "cgroup getpeername4 hooks",
            since: "5.8",
        },
    ),
    (
        "mesh_getpeer6",
        Feature {
            what: "cgroup getpeername6 hooks",
            since: "5.8",
        },
    ),
    (
        "mesh_sockops",
        Feature {
            what: "sock_ops programs",
            since: "4.13",
        },
    ),
    (
        "mesh_sk_lookup",
        Feature {
            what: "sk_lookup programs",
            since: "5.9",
        },
    ),
    (
        "mesh_sock_release",
        Feature {
            what: "cgroup sock_release hooks",
            since: "5.9",
        },
    ),
    (
        "mesh_sk_msg",
        Feature {
            what: "sk_msg programs with a sockhash",
            since: "4.18",
        },
    ),
];

/// Helpers a program type gained after the type itself:
/// (program, helper, feature).
const HELPERS: [(&str, &str, Feature); 7] = [
    (
        "mesh_sockops",
        "bpf_get_netns_cookie",
        Feature {
            what: "bpf_get_netns_cookie in sock_ops programs",
            since: "5.15",
        },
    ),
    (
        "mesh_sk_msg",
        "bpf_get_netns_cookie",
        Feature {
            what: "bpf_get_netns_cookie in sk_msg programs",
            since: "5.15",
        },
    ),
    (
        "mesh_sk_msg",
        "bpf_sk_storage_get",
        Feature {
            what: "socket storage in sk_msg programs",
            since: "5.8",
        },
    ),
    (
        "mesh_sockops",
        "bpf_get_socket_cookie",
        Feature {
            what: "bpf_get_socket_cookie in sock_ops programs",
            since: "4.19",
        },
    ),
    (
        "mesh_sock_release",
        "bpf_get_socket_cookie",
        Feature {
            what: "bpf_get_socket_cookie in cgroup sock programs",
            since: "5.7",
        },
    ),
    (
        "mesh_connect4",
        "bpf_get_socket_cookie",
        Feature {
            what: "bpf_get_socket_cookie in cgroup sock_addr programs",
            since: "4.19",
        },
    ),
    (
        "mesh_connect6",
        "bpf_get_socket_cookie",
        Feature {
            what: "bpf_get_socket_cookie in cgroup sock_addr programs",
            since: "4.19",
        },
    ),
];

/// The programs the agent can run without: the fast path (`sk_msg`) is an
/// optimisation; without it, same-node bytes take loopback TCP.
pub fn optional(program: &str) -> bool {
    program == "mesh_sk_msg"
}

/// The feature `program` lacks, from how the kernel refused it: the
/// helper the verifier did not know, or else (`type_unknown`: EINVAL
/// with no verifier log) the program's own type.
pub fn missing(program: &str, verifier_log: &str, type_unknown: bool) -> Option<Feature> {
    if let Some(helper) = unknown_helper(verifier_log) {
        return HELPERS
            .iter()
            .find(|(p, h, _)| *p == program && *h == helper)
            .map(|(.., f)| *f);
    }
    if type_unknown {
        return PROGRAM_TYPES
            .iter()
            .find(|(p, _)| *p == program)
            .map(|(_, f)| *f);
    }
    None
}

/// The helper the verifier refused, from its two wordings
/// (kernel/bpf/verifier.c, `check_helper_call`): "unknown func bpf_x#N"
/// for a helper the kernel has but not for this program type, and
/// "invalid func unknown#N" for one newer than the kernel, named only by
/// its number.
fn unknown_helper(log: &str) -> Option<&str> {
    if let Some(at) = log.find("unknown func ") {
        let rest = &log[at + "unknown func ".len()..];
        let end = rest.find('#').unwrap_or(rest.len());
        return Some(rest[..end].trim());
    }
    let at = log.find("invalid func unknown#")? + "invalid func unknown#".len();
    let digits: String = log[at..].chars().take_while(char::is_ascii_digit).collect();
    let id: u32 = digits.parse().ok()?;
    HELPER_IDS.iter().find(|(n, _)| *n == id).map(|(_, h)| *h)
}

/// The numbers of the helpers the programs call (include/uapi/linux/bpf.h).
const HELPER_IDS: [(u32, &str); 3] = [
    (46, "bpf_get_socket_cookie"),
    (107, "bpf_sk_storage_get"),
    (122, "bpf_get_netns_cookie"),
];

/// The running kernel's release (`uname -r`), for the message.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_helper_names_the_helper_in_that_program_type() {
        // The verifier's words when a 5.10 kernel loads mesh_sockops.
        let log = "0: R1=ctx() R10=fp0\n; netns_cookie: unsafe { bpf_get_netns_cookie(c) },\n\
                   12: (85) call bpf_get_netns_cookie#122\nunknown func bpf_get_netns_cookie#122\n\
                   processed 12 insns";
        let f = missing("mesh_sockops", log, false).expect("explained");
        assert_eq!(f.since, "5.15");
        assert_eq!(
            f.to_string(),
            "bpf_get_netns_cookie in sock_ops programs (Linux 5.15 or later)"
        );
        // A kernel older than the helper names it by number only.
        let f = missing("mesh_sockops", "invalid func unknown#122\n", false).unwrap();
        assert_eq!(f.what, "bpf_get_netns_cookie in sock_ops programs");
        // The same helper in the fast path's program is its own feature.
        let f = missing("mesh_sk_msg", log, false).unwrap();
        assert!(f.what.contains("sk_msg"), "{f}");
    }

    #[test]
    fn an_unknown_program_type_names_the_type() {
        let f = missing("mesh_sk_lookup", "", true).unwrap();
        assert_eq!(f.what, "sk_lookup programs");
        assert_eq!(f.since, "5.9");
        assert_eq!(missing("mesh_getpeer6", "", true).unwrap().since, "5.8");
    }

    #[test]
    fn other_refusals_are_not_explained_as_missing_features() {
        // A verifier verdict that is not an unknown helper is the
        // program's own problem, not the kernel's age.
        assert_eq!(
            missing("mesh_sockops", "R1 invalid mem access 'scalar'", false),
            None
        );
        // An unknown helper the table does not list is not guessed at.
        assert_eq!(
            missing("mesh_sockops", "unknown func bpf_loop#181", false),
            None
        );
        assert_eq!(missing("mesh_unknown", "", true), None);
    }

    #[test]
    fn every_program_has_its_type_and_only_the_fast_path_is_optional() {
        for (name, _) in super::super::loader::PROGRAMS {
            assert!(
                PROGRAM_TYPES.iter().any(|(p, _)| *p == name),
                "{name} has no entry"
            );
            assert_eq!(optional(name), name == "mesh_sk_msg");
        }
    }
}
