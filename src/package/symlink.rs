//! The one rule for symlinks in a package, shared by the directory walker and the zip reader.
//!
//! A link is kept only if its target is relative, contains no `.` or empty components, has
//! `..` only as a leading run, and that run does not climb above the tree root. A purely
//! lexical check would not be enough: `a -> c/..` with `c -> .` stays inside on paper but
//! resolves to the root's parent. With `..` allowed only before any normal component, each
//! step lands in a real directory of the tree, and by induction every chain of links stays
//! inside.

/// Checks `target` for a link at `link_path` (relative to the tree root, `/`-separated).
pub fn stays_inside(link_path: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains(['\\', '\0']) {
        return false;
    }
    // Depth of the directory holding the link.
    let depth = link_path.split('/').count() - 1;
    let mut ups = 0;
    let mut seen_normal = false;
    for component in target.split('/') {
        match component {
            "" if seen_normal => return false, // `a//b` or a trailing slash
            "" | "." => return false,
            ".." if seen_normal => return false,
            ".." => ups += 1,
            _ => seen_normal = true,
        }
    }
    seen_normal && ups <= depth
}

#[cfg(test)]
mod tests {
    use super::stays_inside;

    #[test]
    fn symlink_rule() {
        assert!(stays_inside("a", "b"));
        assert!(stays_inside("d/a", "../b"));
        assert!(stays_inside("d/e/a", "../../b/c"));
        assert!(!stays_inside("a", "../b"));
        assert!(!stays_inside("a", "/etc/passwd"));
        assert!(!stays_inside("a", "c/.."));
        assert!(!stays_inside("a", "."));
        assert!(!stays_inside("d/a", "../.."));
        assert!(!stays_inside("a", "b/"));
        assert!(!stays_inside("a", "b\\c"));
    }
}
