//! Files and the editor, confined to the workspace.

mod common;

use sandbox_sidecar::client::{Error, FileKind, ListFilesRequest, ReadFileRequest};

#[tokio::test]
async fn read_write_list() {
    let h = common::start().await;
    let c = &h.client;
    let r = c
        .write_file("a/b/c.txt", b"hello\xff".to_vec())
        .await
        .unwrap();
    assert!(r.created);
    assert_eq!(std::fs::read(h.path("a/b/c.txt")).unwrap(), b"hello\xff");
    assert_eq!(c.read_file("a/b/c.txt").await.unwrap(), b"hello\xff");
    let r = c.write_file("a/b/c.txt", "again").await.unwrap();
    assert!(!r.created);
    let part = c
        .read_file_request(ReadFileRequest {
            path: "a/b/c.txt".into(),
            offset: 1,
            max_bytes: 2,
        })
        .await
        .unwrap();
    assert_eq!(part.content, b"ga");
    assert!(part.truncated);
    assert_eq!(part.size, 5);
    h.write(".hidden", "x");
    let l = c
        .list_files(ListFilesRequest {
            recursive: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let names: Vec<(&str, i32)> = l
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e.kind))
        .collect();
    assert_eq!(
        names,
        vec![
            ("a", FileKind::Dir as i32),
            ("a/b", FileKind::Dir as i32),
            ("a/b/c.txt", FileKind::File as i32)
        ]
    );
    assert!(matches!(
        c.read_file("nope.txt").await.unwrap_err(),
        Error::NotFound(_)
    ));
}

#[tokio::test]
async fn path_escapes_are_refused() {
    let h = common::start().await;
    let c = &h.client;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "s3cret").unwrap();
    std::os::unix::fs::symlink(outside.path(), h.path("link-out")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), h.path("file-link-out")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", h.path("passwd")).unwrap();
    let secret = outside.path().join("secret").to_string_lossy().into_owned();
    for p in [
        "../x",
        "a/../../x",
        &secret,
        "/etc/passwd",
        "link-out/secret",
        "file-link-out",
        "passwd",
    ] {
        let e = c.read_file(p).await.unwrap_err();
        assert!(matches!(e, Error::PathRefused(_)), "read {p}: {e:?}");
        let e = c.write_file(p, "pwned").await.unwrap_err();
        assert!(matches!(e, Error::PathRefused(_)), "write {p}: {e:?}");
        let e = c.view(p, 0, 0).await.unwrap_err();
        assert!(matches!(e, Error::PathRefused(_)), "view {p}: {e:?}");
        let e = c.str_replace(p, "s3cret", "x").await.unwrap_err();
        assert!(matches!(e, Error::PathRefused(_)), "str_replace {p}: {e:?}");
        let e = c.create_file(p, "x", true).await.unwrap_err();
        assert!(matches!(e, Error::PathRefused(_)), "create {p}: {e:?}");
        assert!(!e.is_infrastructure());
    }
    let e = c
        .list_files(ListFilesRequest {
            path: "link-out".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PathRefused(_)));
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret")).unwrap(),
        "s3cret"
    );
    assert!(!outside.path().join("x").exists());
    // A symlink that stays inside is fine.
    h.write("real/f.txt", "inside");
    std::os::unix::fs::symlink("real", h.path("alias")).unwrap();
    assert_eq!(c.read_file("alias/f.txt").await.unwrap(), b"inside");
}

#[tokio::test]
async fn editor_outcomes() {
    let h = common::start().await;
    let c = &h.client;
    let original = "def f():\n    return 1\n\ndef g():\n    return 1\n";
    h.write("m.py", original);

    // Zero matches: error says so, file untouched.
    match c
        .str_replace("m.py", "return 3", "return 4")
        .await
        .unwrap_err()
    {
        Error::NoMatch(msg) => assert!(msg.contains("no match"), "{msg}"),
        e => panic!("{e:?}"),
    }
    assert_eq!(h.read("m.py"), original);
    // Two matches: error carries the count, file untouched.
    match c
        .str_replace("m.py", "return 1", "return 2")
        .await
        .unwrap_err()
    {
        Error::MultipleMatches { count, message } => {
            assert_eq!(count, 2);
            assert!(message.contains("2 times"), "{message}");
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(h.read("m.py"), original);
    // Exactly one: replaced, snippet numbered.
    let r = c
        .str_replace("m.py", "def g():\n    return 1", "def g():\n    return 2")
        .await
        .unwrap();
    assert_eq!(
        h.read("m.py"),
        "def f():\n    return 1\n\ndef g():\n    return 2\n"
    );
    assert!(r.snippet.contains("     5\t    return 2"), "{}", r.snippet);

    let v = c.view("m.py", 2, 4).await.unwrap();
    assert_eq!(
        v.content,
        "     2\t    return 1\n     3\t\n     4\tdef g():\n"
    );
    assert_eq!(v.total_lines, 5);

    c.create_file("pkg/new.py", "x = 1\n", false).await.unwrap();
    assert_eq!(h.read("pkg/new.py"), "x = 1\n");
    assert!(matches!(
        c.create_file("pkg/new.py", "y", false).await.unwrap_err(),
        Error::AlreadyExists(_)
    ));
    c.create_file("pkg/new.py", "y = 2\n", true).await.unwrap();
    assert_eq!(h.read("pkg/new.py"), "y = 2\n");
}
