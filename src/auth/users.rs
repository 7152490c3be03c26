//! The users file and Argon2id hashing: the password backend of [`crate::auth`] (RFC 1929
//! username/password and the sudp method's credentials).
//!
//! The users file holds one user per line:
//!
//! ```text
//! # comment
//! alice:$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>
//! ```
//!
//! Blank lines and lines starting with `#` are ignored, and whitespace around a line is
//! trimmed. A name is 1..=255 bytes (the RFC 1929 limit) without `:`, line breaks,
//! surrounding whitespace or a leading `#`; the hash is an Argon2 PHC string, as
//! `sudp passwd --user NAME` prints. Errors name the file and line but never echo a hash or
//! a password (a plaintext password pasted by mistake must not end up in a log).
//!
//! Verification costs one Argon2 computation (tens of milliseconds with the default
//! parameters): the gateway runs it through [`crate::auth::Authenticator`], which bounds how
//! many run at once and how often one source may fail.
//!
//! **Unknown names.** A name that is not in the file is verified against a dummy hash, so
//! that it costs as much as a wrong password. With several parameter sets in one file, the
//! dummy must not be "the first user's" (a name verified in another user's time would then
//! be told apart) nor "the most expensive" (every cheaper known name would stand out).
//! Instead each user line contributes its parameter set once, and an unknown name is
//! verified against the dummy of the set picked by a keyed hash of the name over those
//! lines: an unknown name costs what a known name of some set costs, with the sets' shares
//! in the file, and the same unknown name always costs the same (repeating a probe averages
//! nothing out). The key is a SHA-256 of the file's hash strings (salts and outputs the
//! attacker cannot know), so the choice is stable across restarts while the file is.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, IsTerminal as _, Read as _};
use std::path::Path;
use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHashString, SaltString};
use argon2::{Algorithm, Argon2, Params, PasswordHasher as _};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::{Backend, Cost, Credentials, Identity, Method};

/// Longest user name or password RFC 1929 can carry (a one-byte length).
pub const MAX_LEN: usize = 255;

/// Largest Argon2 memory cost accepted from a users file, in KiB (1 GiB): every login
/// allocates this much, so a typo must not make each attempt exhaust memory.
pub const MAX_M_COST: u32 = 1 << 20;

/// Largest Argon2 time cost (passes) accepted from a users file.
pub const MAX_T_COST: u32 = 64;

/// Largest Argon2 parallelism accepted from a users file.
pub const MAX_P_COST: u32 = 64;

/// Errors of the users file and of password hashing. None carries a password or a hash.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The users file could not be read.
    #[error("{origin}: cannot read: {error}")]
    Read {
        /// The file.
        origin: String,
        /// What the OS said.
        error: io::Error,
    },
    /// A line of the users file is malformed.
    #[error("{origin}:{line}: {problem}")]
    Parse {
        /// The file.
        origin: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        problem: &'static str,
    },
    /// A user name is not one the users file can hold.
    #[error("invalid user name: {problem}")]
    BadName {
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A password is empty or longer than 255 bytes.
    #[error("password must be 1 to 255 bytes")]
    PasswordLength,
    /// Argon2 failed.
    #[error("password hashing: {0}")]
    Hash(argon2::password_hash::Error),
}

/// The users allowed to authenticate with a password, by name.
#[derive(Clone)]
pub struct Users {
    users: HashMap<Vec<u8>, PasswordHashString>,
    /// One dummy hash per distinct parameter set of the file (Argon2 defaults for an empty
    /// file): what unknown names are verified against (see the module documentation).
    dummies: Vec<PasswordHashString>,
    /// For each user line, in file order, the index of its set in `dummies`; never empty.
    line_sets: Vec<usize>,
    /// Key of the hash that picks a line of `line_sets` for an unknown name.
    pick_key: [u8; 32],
}

impl Users {
    /// Reads and parses a users file.
    pub fn load(path: &Path) -> Result<Users, AuthError> {
        let origin = path.display().to_string();
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|error| AuthError::Read {
            origin: origin.clone(),
            error,
        })?);
        Users::parse(&text, &origin)
    }

    /// Parses users-file text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Users, AuthError> {
        let mut users = HashMap::new();
        let mut dummies: Vec<PasswordHashString> = Vec::new();
        let mut set_keys: Vec<String> = Vec::new();
        let mut line_sets = Vec::new();
        let mut key = Sha256::new();
        key.update(b"sudp users-file dummy pick v1");
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |problem| AuthError::Parse {
                origin: origin.to_owned(),
                line: i + 1,
                problem,
            };
            let (name, hash) = line
                .split_once(':')
                .ok_or_else(|| err("expected name:hash (no ':' found)"))?;
            check_name(name.as_bytes()).map_err(err)?;
            let hash = parse_hash(hash).map_err(err)?;
            if users.contains_key(name.as_bytes()) {
                return Err(err("duplicate user name"));
            }
            let set = param_set(&hash);
            let index = match set_keys.iter().position(|k| *k == set) {
                Some(i) => i,
                None => {
                    dummies.push(dummy_like(Some(&hash))?);
                    set_keys.push(set);
                    dummies.len() - 1
                }
            };
            line_sets.push(index);
            key.update(hash.as_str().as_bytes());
            key.update(b"\n");
            users.insert(name.as_bytes().to_vec(), hash);
        }
        if dummies.is_empty() {
            dummies.push(dummy_like(None)?);
            line_sets.push(0);
        }
        Ok(Users {
            users,
            dummies,
            line_sets,
            pick_key: key.finalize().into(),
        })
    }

    /// Whether `pass` is `user`'s password.
    ///
    /// An unknown user costs one Argon2 verification too, so response times do not tell
    /// which users exist.
    pub fn verify(&self, user: &[u8], pass: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => verify_phc(hash, pass),
            None => {
                let _ = verify_phc(self.dummy_for(user), pass);
                false
            }
        }
    }

    /// The dummy hash an unknown `user` is verified against.
    fn dummy_for(&self, user: &[u8]) -> &PasswordHashString {
        let digest: [u8; 32] = Sha256::new()
            .chain_update(self.pick_key)
            .chain_update(user)
            .finalize()
            .into();
        let mut head = [0u8; 8];
        head.copy_from_slice(&digest[..8]);
        // The modulo bias of a 64-bit value over a few thousand lines is negligible.
        let line = (u64::from_be_bytes(head) % self.line_sets.len() as u64) as usize;
        &self.dummies[self.line_sets[line]]
    }

    /// The distinct Argon2 parameter sets of the file (`algorithm v=.. m=..,t=..,p=..`),
    /// one per set, for diagnostics and tests.
    pub fn parameter_sets(&self) -> Vec<String> {
        self.dummies.iter().map(param_set).collect()
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file named no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Users")
            .field("len", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl Backend for Users {
    fn method(&self) -> Method {
        Method::Password
    }

    fn cost(&self) -> Cost {
        Cost::Expensive
    }

    fn verify(&self, credentials: &Credentials) -> Option<Identity> {
        let Credentials::Password { user, pass } = credentials else {
            return None;
        };
        if !Users::verify(self, user, pass) {
            return None;
        }
        // A name the file holds came from UTF-8 text, so this conversion succeeds.
        let name = std::str::from_utf8(user).ok()?;
        Some(Identity::password(name))
    }
}

/// A users file that a reload replaces whole while connections authenticate against it:
/// each check loads the file in force when it starts (lock-free), so a check never sees
/// half of an old file and half of a new one.
pub struct ReloadableUsers(arc_swap::ArcSwap<Users>);

impl ReloadableUsers {
    /// Starts with `users`.
    pub fn new(users: Arc<Users>) -> ReloadableUsers {
        ReloadableUsers(arc_swap::ArcSwap::new(users))
    }

    /// The users in force now.
    pub fn current(&self) -> Arc<Users> {
        self.0.load_full()
    }

    /// Puts `users` in force for every authentication that starts from now on.
    pub fn replace(&self, users: Arc<Users>) {
        self.0.store(users);
    }
}

impl Backend for ReloadableUsers {
    fn method(&self) -> Method {
        Method::Password
    }

    fn cost(&self) -> Cost {
        self.0.load().cost()
    }

    fn verify(&self, credentials: &Credentials) -> Option<Identity> {
        Backend::verify(&**self.0.load(), credentials)
    }
}

/// Hashes a password (1..=255 bytes) with Argon2id, default parameters and a random salt,
/// into a PHC string for the users file.
pub fn hash_password(pass: &[u8]) -> Result<String, AuthError> {
    if pass.is_empty() || pass.len() > MAX_LEN {
        return Err(AuthError::PasswordLength);
    }
    let salt = SaltString::generate(&mut OsRng);
    let hash = Argon2::default()
        .hash_password(pass, &salt)
        .map_err(AuthError::Hash)?;
    Ok(hash.to_string())
}

/// Command-line arguments of `sudp passwd`.
#[derive(Debug, clap::Args)]
pub struct PasswdArgs {
    /// User name for the users-file line.
    #[arg(long, value_name = "NAME")]
    pub user: String,
}

/// Runs `sudp passwd`: reads a password from the first line of stdin and prints the
/// `name:hash` line for the users file. The password is never printed or logged.
pub fn run_passwd(args: PasswdArgs) -> anyhow::Result<()> {
    let stdin = io::stdin();
    if stdin.is_terminal() {
        eprintln!(
            "Password for {} (the terminal echoes it; pipe it in to avoid that):",
            args.user
        );
    }
    let line = passwd_line(&args.user, &mut stdin.lock())?;
    println!("{line}");
    Ok(())
}

/// The users-file line for `user` and the password on the first line of `input`.
fn passwd_line(user: &str, input: &mut impl BufRead) -> Result<String, AuthError> {
    check_name(user.as_bytes()).map_err(|problem| AuthError::BadName { problem })?;
    // Room for any password plus its line end, so the buffer never reallocates and leaves
    // an unzeroized copy behind; anything longer is refused below anyway.
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_LEN + 3));
    input
        .take(MAX_LEN as u64 + 2)
        .read_until(b'\n', &mut buf)
        .map_err(|error| AuthError::Read {
            origin: "stdin".to_owned(),
            error,
        })?;
    let mut pass: &[u8] = &buf;
    if let Some(rest) = pass.strip_suffix(b"\n") {
        pass = rest.strip_suffix(b"\r").unwrap_or(rest);
    }
    Ok(format!("{user}:{}", hash_password(pass)?))
}

/// Checks a name against what the users file can hold.
fn check_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty user name");
    }
    if name.len() > MAX_LEN {
        return Err("user name longer than 255 bytes");
    }
    if name.contains(&b':') {
        return Err("user name contains ':'");
    }
    if name.iter().any(|&b| b == b'\n' || b == b'\r') {
        return Err("user name contains a line break");
    }
    if name.first() == Some(&b'#') {
        return Err("user name starts with '#' (a comment)");
    }
    if name.first().is_some_and(u8::is_ascii_whitespace) || name.last().is_some_and(u8::is_ascii_whitespace) {
        return Err("user name starts or ends with whitespace");
    }
    Ok(())
}

/// Parses and checks an Argon2 PHC string.
fn parse_hash(s: &str) -> Result<PasswordHashString, &'static str> {
    let hash = PasswordHashString::new(s).map_err(|_| "malformed PHC hash string")?;
    let phc = hash.password_hash();
    Algorithm::try_from(phc.algorithm).map_err(|_| "not an Argon2 hash")?;
    if phc.salt.is_none() || phc.hash.is_none() {
        return Err("hash string without salt or output");
    }
    // An unknown version would pass here and then fail every verification (and, on the
    // first line, the dummy hash): refuse it with the line's number instead.
    if let Some(v) = phc.version {
        argon2::Version::try_from(v).map_err(|_| "unsupported Argon2 version (v=16 or v=19)")?;
    }
    let params = Params::try_from(&phc).map_err(|_| "invalid Argon2 parameters")?;
    if params.m_cost() > MAX_M_COST || params.t_cost() > MAX_T_COST || params.p_cost() > MAX_P_COST {
        return Err("Argon2 cost parameters too large");
    }
    Ok(hash)
}

thread_local! {
    /// Argon2 working memory, reused by every check on this thread. Allocating it afresh
    /// for each check (as `PasswordVerifier` does) lets the allocator keep freed 19 MiB
    /// chunks resident per arena, several per thread over time: a few hundred MiB after a
    /// burst of failed logins. Reused, it is at most the file's largest `m` per checking
    /// thread, for the life of the thread.
    static MEMORY: std::cell::RefCell<Vec<argon2::Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether `pass` matches the PHC string `hash`, in constant time over the output, with
/// this thread's reused working memory.
fn verify_phc(hash: &PasswordHashString, pass: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    let phc = hash.password_hash();
    let (Some(salt), Some(expected)) = (phc.salt, phc.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(phc.algorithm) else {
        return false;
    };
    let version = match phc.version.map(argon2::Version::try_from) {
        None => argon2::Version::V0x13,
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&phc) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    let argon2 = Argon2::new(algorithm, version, params);
    let mut out = Zeroizing::new(vec![0u8; expected.len()]);
    let hashed = MEMORY.with_borrow_mut(|memory| {
        if memory.len() < blocks {
            memory.resize(blocks, argon2::Block::default());
        }
        argon2
            .hash_password_into_with_memory(pass, salt, &mut out, &mut memory[..blocks])
            .is_ok()
    });
    hashed && bool::from(out.ct_eq(expected.as_bytes()))
}

/// What makes two hashes cost the same: algorithm, version, memory, passes, lanes and
/// output length (the salt's length costs nothing measurable).
fn param_set(hash: &PasswordHashString) -> String {
    let phc = hash.password_hash();
    let out = phc.hash.map_or(0, |h| h.len());
    format!(
        "{} v={} {} out={out}",
        phc.algorithm,
        phc.version.unwrap_or(0),
        phc.params
    )
}

/// A hash of an arbitrary password with the algorithm and parameters of `like` (Argon2
/// defaults when `None`) and a fresh salt.
fn dummy_like(like: Option<&PasswordHashString>) -> Result<PasswordHashString, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    let argon2 = Argon2::default();
    let hash = match like {
        None => argon2.hash_password(b"sudp-dummy", &salt),
        Some(like) => {
            let like = like.password_hash();
            // `parse_hash` accepted `like`, so this conversion succeeds in practice.
            let params = Params::try_from(&like).map_err(AuthError::Hash)?;
            argon2.hash_password_customized(b"sudp-dummy", Some(like.algorithm), like.version, params, &salt)
        }
    };
    Ok(hash.map_err(AuthError::Hash)?.serialize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users_with(entries: &[(&str, &str)]) -> Users {
        let text: String = entries
            .iter()
            .map(|(name, pass)| format!("{name}:{}\n", hash_password(pass.as_bytes()).unwrap()))
            .collect();
        Users::parse(&text, "users").unwrap()
    }

    #[test]
    fn reloadable_users_check_against_the_file_in_force() {
        let swap = ReloadableUsers::new(Arc::new(users_with(&[("alice", "a-pw")])));
        let bob = Credentials::password(b"bob", b"b-pw");
        let alice = Credentials::password(b"alice", b"a-pw");
        assert_eq!(Backend::verify(&swap, &bob), None);
        swap.replace(Arc::new(users_with(&[("bob", "b-pw")])));
        assert_eq!(Backend::verify(&swap, &bob), Some(Identity::password("bob")));
        assert_eq!(Backend::verify(&swap, &alice), None, "the old file is gone whole");
        assert_eq!(swap.current().len(), 1);
        assert_eq!(swap.method(), Method::Password);
    }

    #[test]
    fn hash_then_verify() {
        let users = users_with(&[("alice", "correct horse"), ("bob", "battery staple")]);
        assert_eq!(users.len(), 2);
        assert!(users.verify(b"alice", b"correct horse"));
        assert!(users.verify(b"bob", b"battery staple"));
        assert!(!users.verify(b"alice", b"battery staple"));
        assert!(!users.verify(b"alice", b"correct horse "));
        assert!(!users.verify(b"alice", b""));
        assert!(!users.verify(b"carol", b"correct horse"));
        assert!(!users.verify(b"", b""));
    }

    #[test]
    fn hashes_are_argon2id_with_default_params_and_salted() {
        let a = hash_password(b"pw").unwrap();
        let b = hash_password(b"pw").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert!(matches!(hash_password(b""), Err(AuthError::PasswordLength)));
        assert!(matches!(
            hash_password(&[b'x'; 256]),
            Err(AuthError::PasswordLength)
        ));
        assert!(hash_password(&[b'x'; 255]).is_ok());
    }

    #[test]
    fn comments_blank_lines_and_whitespace() {
        let hash = hash_password(b"pw").unwrap();
        let text = format!("# users\n\n   \n  alice:{hash}  \r\n# bob:{hash}\n");
        let users = Users::parse(&text, "users").unwrap();
        assert_eq!(users.len(), 1);
        assert!(users.verify(b"alice", b"pw"));
        assert!(!users.verify(b"bob", b"pw"));
        let empty = Users::parse("# nobody\n", "users").unwrap();
        assert!(empty.is_empty());
        assert!(!empty.verify(b"alice", b"pw"));
    }

    #[test]
    fn parse_errors_name_the_line_and_hide_secrets() {
        let hash = hash_password(b"pw").unwrap();
        let cases = [
            (format!("# ok\nalice:{hash}\nhunter2\n"), 3, "no ':'"),
            (format!(":{hash}\n"), 1, "empty user name"),
            (format!("{}:{hash}\n", "n".repeat(256)), 1, "longer than 255"),
            ("alice:hunter2\n".to_string(), 1, "malformed PHC"),
            (
                "alice:$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\n".to_string(),
                1,
                "not an Argon2",
            ),
            (
                format!("alice:{}\n", hash.replace("m=19456", "m=4294967295")),
                1,
                "too large",
            ),
            (format!("alice:{hash}\n\nalice:{hash}\n"), 3, "duplicate"),
        ];
        for (text, line, problem) in cases {
            let err = Users::parse(&text, "users.txt").unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with(&format!("users.txt:{line}: ")), "{msg}");
            assert!(msg.contains(problem), "{msg}");
            assert!(!msg.contains("hunter2") && !msg.contains('$'), "{msg}");
        }
        // A 255-byte name is fine.
        Users::parse(&format!("{}:{hash}\n", "n".repeat(255)), "users").unwrap();
    }

    #[test]
    fn dummy_follows_the_file_parameters() {
        let params = Params::new(8 * 1024, 1, 1, None).unwrap();
        let salt = SaltString::generate(&mut OsRng);
        let cheap = Argon2::new(Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        let users = Users::parse(&format!("alice:{cheap}\n"), "users").unwrap();
        assert!(users.verify(b"alice", b"pw"));
        assert_eq!(users.dummies.len(), 1);
        assert_eq!(users.dummies[0].params().to_string(), "m=8192,t=1,p=1");
        assert_eq!(users.dummies[0].algorithm().as_str(), "argon2id");
    }

    fn hash_with(m: u32, t: u32, pass: &[u8]) -> String {
        let params = Params::new(m, t, 1, None).unwrap();
        let salt = SaltString::generate(&mut OsRng);
        Argon2::new(Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(pass, &salt)
            .unwrap()
            .to_string()
    }

    #[test]
    fn reused_memory_verification_agrees_with_the_argon2_crate() {
        use argon2::PasswordVerifier as _;
        for (hash, pass) in [
            (hash_with(8, 1, b"pw"), &b"pw"[..]),
            (hash_with(64, 3, b"\xff\x00"), &b"\xff\x00"[..]),
            (hash_password(b"default").unwrap(), &b"default"[..]),
        ] {
            let phc = PasswordHashString::new(&hash).unwrap();
            for candidate in [pass, b"other", b""] {
                let want = Argon2::default()
                    .verify_password(candidate, &phc.password_hash())
                    .is_ok();
                assert_eq!(verify_phc(&phc, candidate), want, "{hash} {candidate:?}");
            }
        }
        // Argon2d and Argon2i, and a hash without version.
        for alg in [Algorithm::Argon2d, Algorithm::Argon2i] {
            let params = Params::new(8, 1, 1, None).unwrap();
            let salt = SaltString::generate(&mut OsRng);
            let h = Argon2::new(alg, argon2::Version::V0x13, params)
                .hash_password(b"pw", &salt)
                .unwrap()
                .serialize();
            assert!(verify_phc(&h, b"pw") && !verify_phc(&h, b"px"));
        }
    }

    #[test]
    fn unknown_names_are_spread_over_every_parameter_set() {
        // Two sets, one of them twice: the dummies cover exactly the file's sets.
        let text = format!(
            "a:{}\nb:{}\nc:{}\n",
            hash_with(8, 1, b"pw"),
            hash_with(16, 2, b"pw"),
            hash_with(8, 1, b"pw")
        );
        let users = Users::parse(&text, "users").unwrap();
        let sets = users.parameter_sets();
        assert_eq!(sets.len(), 2, "{sets:?}");
        assert!(
            sets[0].contains("m=8,t=1,p=1") && sets[1].contains("m=16,t=2,p=1"),
            "{sets:?}"
        );
        assert_eq!(users.line_sets, [0, 1, 0]);
        // Unknown names land on both sets (about 2:1), and always the same one per name.
        let mut hits = [0usize; 2];
        for i in 0..300 {
            let name = format!("nobody-{i}");
            let d = users.dummy_for(name.as_bytes());
            assert!(std::ptr::eq(d, users.dummy_for(name.as_bytes())));
            let idx = users.dummies.iter().position(|x| std::ptr::eq(x, d)).unwrap();
            hits[idx] += 1;
        }
        assert!(hits[0] > 150 && hits[1] > 60, "{hits:?}");
        assert!(!users.verify(b"nobody", b"pw"));
        // The same file gives the same choice (stable across restarts), another file not
        // necessarily: the key comes from the file's hashes.
        let again = Users::parse(&text, "users").unwrap();
        assert_eq!(again.pick_key, users.pick_key);
        assert_eq!(again.parameter_sets(), sets);
    }

    #[test]
    fn load_names_the_file() {
        let err = Users::load(Path::new("/nonexistent/sudp/users")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/sudp/users: cannot read"),
            "{err}"
        );

        let path = std::env::temp_dir().join(format!("sudp-users-test-{}", std::process::id()));
        std::fs::write(&path, format!("alice:{}\n", hash_password(b"pw").unwrap())).unwrap();
        let users = Users::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(users.verify(b"alice", b"pw"));
    }

    #[test]
    fn passwd_reads_the_first_line() {
        for input in [&b"s3cret\r\nignored\n"[..], b"s3cret\n", b"s3cret"] {
            let line = passwd_line("alice", &mut &input[..]).unwrap();
            assert!(!line.contains("s3cret"));
            let users = Users::parse(&line, "stdout").unwrap();
            assert!(users.verify(b"alice", b"s3cret"));
        }
        // Bytes that are not UTF-8 are a valid RFC 1929 password.
        let line = passwd_line("bob", &mut &b"\xff\xfe\n"[..]).unwrap();
        assert!(Users::parse(&line, "stdout").unwrap().verify(b"bob", b"\xff\xfe"));
    }

    #[test]
    fn passwd_refusals() {
        let refuse = |user: &str, input: &[u8]| passwd_line(user, &mut &input[..]).unwrap_err();
        assert!(matches!(refuse("alice", b"\n"), AuthError::PasswordLength));
        assert!(matches!(refuse("alice", b""), AuthError::PasswordLength));
        assert!(matches!(refuse("alice", &[b'x'; 256]), AuthError::PasswordLength));
        let long_line = [&[b'x'; 300][..], b"\n"].concat();
        assert!(matches!(refuse("alice", &long_line), AuthError::PasswordLength));
        for bad in ["", "a:b", "#root", " alice", "alice ", "a\nb"] {
            assert!(
                matches!(refuse(bad, b"pw\n"), AuthError::BadName { .. }),
                "{bad:?}"
            );
        }
        assert!(passwd_line(&"n".repeat(255), &mut &b"pw\n"[..]).is_ok());
    }

    /// The users file against a model: content lines (not blank, not `#`, surrounding
    /// blanks ignored) must each be `name:hash` with a name `check_name` allows and no
    /// name twice. Generated files mix valid lines, comments, blank lines and one broken
    /// line of a chosen kind; property: accepted iff the model accepts, with one user per
    /// content line, and a refusal names the first bad line and never its hash. Counted
    /// per outcome so every refusal kind is reached. (Hashes use Argon2 m=8, t=1: the
    /// parser hashes a dummy with the file's parameters.)
    #[test]
    fn users_file_matches_its_model() {
        use crate::proto::testing::{assert_reached, counted};
        use proptest::prelude::*;

        const HASH: &str = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
        let line = prop_oneof![
            3 => "[a-zA-Z0-9_.@-]{1,20}".prop_map(|n| (format!("{n}:{HASH}"), "valid")),
            1 => "[ -~]{0,20}".prop_map(|c| (format!("# {c}"), "comment")),
            1 => Just((String::new(), "blank")),
            1 => "[a-z]{1,8}".prop_map(|n| (format!("  {n}:{HASH} \t"), "valid")),
        ];
        let broken = prop::sample::select(vec![
            "no-colon",
            "empty-name",
            "name-space",
            "bad-hash",
            "duplicate",
            "long-name",
            "none",
        ]);
        let strategy = (
            prop::collection::vec(line, 1..6),
            broken,
            any::<prop::sample::Index>(),
        );
        let counts = counted(300, strategy, |(mut lines, broken, at)| {
            // At least one user, so the dummy hash gets the cheap parameters (an empty file
            // gets Argon2's defaults: tens of milliseconds per case; tested above).
            lines.insert(0, (format!("first:{HASH}"), "valid"));
            let first_valid = lines.iter().find(|(_, k)| *k == "valid").map(|(l, _)| l.clone());
            let bad = match broken {
                "no-colon" => Some("carol".to_owned()),
                "empty-name" => Some(format!(":{HASH}")),
                "name-space" => Some(format!("ca rol :{HASH}")),
                "bad-hash" => Some("carol:$argon2id$v=19$m=8,t=1,p=1$c2FsdA".to_owned()),
                "duplicate" => first_valid,
                "long-name" => Some(format!("{}:{HASH}", "n".repeat(256))),
                _ => None,
            };
            if let Some(bad) = &bad {
                lines.insert(at.index(lines.len() + 1), (bad.clone(), "bad"));
            }
            let text: String = lines.iter().map(|(l, _)| format!("{l}\n")).collect();
            // The model.
            let mut names = std::collections::HashSet::new();
            let mut first_bad = None;
            for (i, (l, _)) in lines.iter().enumerate() {
                let l = l.trim();
                if l.is_empty() || l.starts_with('#') {
                    continue;
                }
                // Written from docs/CONFIG.md's rules, not from `check_name`.
                let name_ok = |n: &str| {
                    let b = n.as_bytes();
                    (1..=255).contains(&b.len())
                        && !b.contains(&b':')
                        && b[0] != b'#'
                        && !b[0].is_ascii_whitespace()
                        && !b[b.len() - 1].is_ascii_whitespace()
                };
                let ok = l
                    .split_once(':')
                    .is_some_and(|(n, h)| name_ok(n) && h == HASH && names.insert(n.to_owned()));
                if !ok {
                    first_bad = Some(i + 1);
                    break;
                }
            }
            match (Users::parse(&text, "u"), first_bad) {
                (Ok(u), None) => {
                    prop_assert_eq!(u.len(), names.len());
                    Ok(if names.is_empty() {
                        "accepted, no users"
                    } else {
                        "accepted"
                    })
                }
                (Err(AuthError::Parse { line, problem, .. }), Some(want)) => {
                    prop_assert_eq!(line, want);
                    let shown = format!(
                        "{}",
                        AuthError::Parse {
                            origin: "u".into(),
                            line,
                            problem
                        }
                    );
                    prop_assert!(!shown.contains("aGFzaGhh") && !shown.contains("c2FsdA"));
                    Ok(broken)
                }
                (got, want) => Err(TestCaseError::fail(format!(
                    "parser {got:?}, model refuses line {want:?}"
                ))),
            }
        });
        assert_reached(
            &counts,
            &[
                "accepted",
                "no-colon",
                "empty-name",
                "name-space",
                "bad-hash",
                "duplicate",
                "long-name",
            ],
            5,
        );
    }

    /// Found by the `users` fuzz target: an Argon2 version other than 0x10/0x13 passed the
    /// line check, then made the dummy hash fail with an error naming neither file nor
    /// line (first line), or left a user who could never log in (later lines).
    #[test]
    fn unknown_argon2_version_is_refused_with_its_line() {
        const OK: &str = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
        let bad = OK.replace("v=19", "v=96");
        for text in [format!("dave:{bad}\n"), format!("carol:{OK}\ndave:{bad}\n")] {
            let line = text.lines().count();
            match Users::parse(&text, "users") {
                Err(AuthError::Parse { line: l, problem, .. }) => {
                    assert_eq!(l, line);
                    assert!(problem.contains("version"), "{problem}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            Users::parse(&format!("e:{}\n", OK.replace("v=19", "v=16")), "u")
                .unwrap()
                .len(),
            1
        );
    }
}
