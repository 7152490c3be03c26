//! Destination policy: which addresses a client may reach through the gateway.
//!
//! The same [`Policy`] is checked for every destination the gateway would send to on a
//! client's behalf: the target of a CONNECT, and the destination of each naked or secure UDP
//! datagram.
//!
//! A [`Rule`] is an action ([`Action::Allow`] or [`Action::Deny`]), a network and an optional
//! inclusive port range. [`Policy::check`] walks the user's own rules, then the global rules,
//! taking the first match in each list; when nothing matches, the built-in default decides:
//! every address that is not a public unicast address is denied (see [`DefaultDeny`] for the
//! classes: loopback, link-local, unspecified, private, CGNAT, unique-local, multicast,
//! broadcast), and so are the gateway host's own interface addresses and the directed
//! broadcast addresses of its interfaces, so that a client reaches neither the networks
//! behind the gateway nor the services of the gateway host itself (nor cloud metadata
//! endpoints such as 169.254.169.254). Everything else is allowed. [`DEFAULT_POLICY_HELP`]
//! says this in words; `--allow` rules open what an operator wants.
//!
//! The policy stays pure: it does not ask the system for the host's addresses. Whoever runs
//! it hands them in as a [`LocalAddrs`] ([`Policy::set_local_addrs`], which every clone of
//! the policy sees, so the gateway can refresh them while it runs).
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are treated as the IPv4 address they carry,
//! both for destinations and for rule networks. Otherwise `::ffff:127.0.0.1` would slip past
//! a deny rule for `127.0.0.0/8` while a dual-stack socket happily delivers to loopback.
//! A consequence: an IPv6 rule (say `::/0`) never matches an IPv4 or IPv4-mapped destination.
//!
//! Rule syntax (see [`Rule::parse`]):
//!
//! ```text
//! 10.0.0.0/8            a network, any port
//! 192.0.2.1             a host (/32; /128 for IPv6)
//! 2001:db8::/32         an IPv6 network; "[2001:db8::]/32" is the same
//! 10.0.0.0/8:53         port 53 only
//! 0.0.0.0/0:5000-5100   ports 5000 to 5100 inclusive
//! [::1]/128:80          an IPv6 network with a port: brackets required
//! [2001:db8::1]:443     an IPv6 host with a port
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::{IpNet, Ipv4Net};

/// The built-in default in one or two sentences, for `--help` and the docs.
pub const DEFAULT_POLICY_HELP: &str = "Default policy: a destination that no rule matches is \
    allowed only if it is a public address. Denied unless an allow rule matches them: \
    loopback (127.0.0.0/8, ::1), link-local (169.254.0.0/16, fe80::/10), unspecified \
    (0.0.0.0, ::), private (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16), CGNAT \
    (100.64.0.0/10), unique-local (fc00::/7), multicast (224.0.0.0/4, ff00::/8), broadcast \
    (255.255.255.255 and the directed broadcast of the gateway's interfaces) and the \
    gateway host's own interface addresses, each also in its IPv4-mapped IPv6 form. With \
    --default-deny everything no allow rule matches is denied.";

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let the destination through.
    Allow,
    /// Refuse the destination.
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// One policy rule: an action for destinations inside `net` (and `ports`, when given).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// What to do with a matching destination.
    pub action: Action,
    /// Destination network. [`Rule::parse`] stores it canonical: host bits clear and an
    /// IPv4-mapped IPv6 network rewritten as the IPv4 network it covers.
    pub net: IpNet,
    /// Inclusive destination port range; `None` matches every port.
    pub ports: Option<(u16, u16)>,
}

impl Rule {
    /// Parses the rule text `text` (a network, host or either with a port or port range; see
    /// the module docs) into a rule with `action`.
    ///
    /// A network with host bits set (`10.0.0.1/8`) is refused rather than silently widened,
    /// since it is usually a typo for a host or a narrower network.
    pub fn parse(action: Action, text: &str) -> Result<Rule, RuleError> {
        let (net, ports) = parse_target(text).map_err(|problem| RuleError {
            rule: text.to_owned(),
            problem,
        })?;
        Ok(Rule { action, net, ports })
    }

    /// Whether `dst` falls inside this rule's network and port range. IPv4-mapped IPv6
    /// destinations match as the IPv4 address they carry.
    pub fn matches(&self, dst: SocketAddr) -> bool {
        self.matches_canonical(canonical_ip(dst.ip()), dst.port())
    }

    fn matches_canonical(&self, ip: IpAddr, port: u16) -> bool {
        self.net.contains(&ip) && self.ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&port))
    }
}

/// Formats as `allow 10.0.0.0/8:53`, in the syntax [`Rule::parse`] reads (after the action).
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.action)?;
        match (self.net, self.ports) {
            (IpNet::V6(net), Some(_)) => write!(f, "[{}]/{}", net.addr(), net.prefix_len())?,
            (net, _) => write!(f, "{net}")?,
        }
        match self.ports {
            None => Ok(()),
            Some((lo, hi)) if lo == hi => write!(f, ":{lo}"),
            Some((lo, hi)) => write!(f, ":{lo}-{hi}"),
        }
    }
}

/// A rule that could not be parsed: the rule text and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rule \"{rule}\": {problem}")]
pub struct RuleError {
    /// The rule text as given.
    pub rule: String,
    /// What is wrong with it.
    pub problem: RuleProblem,
}

/// What is wrong with a rule's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleProblem {
    /// Nothing but whitespace.
    #[error("empty rule")]
    Empty,
    /// The address part is not an IP address.
    #[error("\"{0}\" is not an IP address (IPv6 with a port needs brackets: [2001:db8::1]:443)")]
    BadAddress(String),
    /// A `[` without its `]`.
    #[error("missing ']' after the IPv6 address")]
    UnclosedBracket,
    /// The prefix length is not a number.
    #[error("prefix length \"{0}\" is not a number")]
    BadPrefix(String),
    /// The prefix length is longer than the address.
    #[error("prefix length {len} is longer than {max}")]
    PrefixTooLong {
        /// The prefix length given.
        len: u8,
        /// The longest prefix for that address family.
        max: u8,
    },
    /// The address has bits set beyond the prefix length.
    #[error("host bits are set beyond the prefix length (did you mean {network}?)")]
    HostBitsSet {
        /// The network the address would truncate to.
        network: IpNet,
    },
    /// A port is not a number from 0 to 65535.
    #[error("port \"{0}\" is not a number from 0 to 65535")]
    BadPort(String),
    /// A port range whose start is above its end.
    #[error("port range {lo}-{hi} is empty (start above end)")]
    EmptyPortRange {
        /// Start of the range as given.
        lo: u16,
        /// End of the range as given.
        hi: u16,
    },
    /// Text after the address that is neither `/prefix` nor `:port`.
    #[error("unexpected \"{0}\" after the address (expected /PREFIX and/or :PORT[-PORT])")]
    Trailing(String),
}

/// Why the built-in default refuses a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DefaultDeny {
    /// 127.0.0.0/8 or ::1.
    Loopback,
    /// 169.254.0.0/16 or fe80::/10.
    LinkLocal,
    /// 0.0.0.0 or ::.
    Unspecified,
    /// 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16 (RFC 1918).
    Private,
    /// 100.64.0.0/10, carrier-grade NAT shared space (RFC 6598).
    Cgnat,
    /// fc00::/7 (RFC 4193).
    UniqueLocal,
    /// 224.0.0.0/4 or ff00::/8.
    Multicast,
    /// 255.255.255.255, or the directed broadcast address of one of the gateway's
    /// interfaces.
    Broadcast,
    /// An address of one of the gateway host's own interfaces.
    LocalAddress,
    /// The policy denies everything no rule allows ([`Policy::deny_by_default`]).
    All,
}

impl fmt::Display for DefaultDeny {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DefaultDeny::Loopback => "loopback address (127.0.0.0/8, ::1)",
            DefaultDeny::LinkLocal => "link-local address (169.254.0.0/16, fe80::/10)",
            DefaultDeny::Unspecified => "unspecified address (0.0.0.0, ::)",
            DefaultDeny::Private => "private address (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)",
            DefaultDeny::Cgnat => "shared CGNAT address (100.64.0.0/10)",
            DefaultDeny::UniqueLocal => "unique-local address (fc00::/7)",
            DefaultDeny::Multicast => "multicast address (224.0.0.0/4, ff00::/8)",
            DefaultDeny::Broadcast => "broadcast address",
            DefaultDeny::LocalAddress => "an address of the gateway host itself",
            DefaultDeny::All => "no allow rule matches (default deny)",
        })
    }
}

/// What refused a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeniedBy {
    /// One of the user's own rules.
    UserRule {
        /// The authenticated user.
        user: String,
        /// The first matching rule.
        rule: Rule,
    },
    /// A global rule.
    GlobalRule(Rule),
    /// No rule matched and the built-in default denies.
    Default(DefaultDeny),
}

impl fmt::Display for DeniedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeniedBy::UserRule { user, rule } => write!(f, "rule `{rule}` of user {user:?}"),
            DeniedBy::GlobalRule(rule) => write!(f, "global rule `{rule}`"),
            DeniedBy::Default(why) => write!(f, "the default policy: {why}"),
        }
    }
}

/// A destination the policy refused, and what refused it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("destination {dst} denied by {by}")]
pub struct Denied {
    /// The destination as the client asked for it.
    pub dst: SocketAddr,
    /// The rule, or the default, that refused it.
    pub by: DeniedBy,
}

/// The gateway host's own addresses, which the built-in default denies: the address of
/// each interface and, for IPv4 interfaces with a broadcast domain, its directed broadcast
/// address. Built by the caller (the gateway enumerates its interfaces); stored canonical.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalAddrs {
    addrs: HashSet<IpAddr>,
    broadcasts: HashSet<IpAddr>,
}

impl LocalAddrs {
    /// The set of `interfaces`, each an address and its prefix length (the netmask). An
    /// IPv4 interface whose prefix is shorter than /31 also contributes its directed
    /// broadcast address (host bits all set; /31 and /32 have none, RFC 3021).
    pub fn new(interfaces: impl IntoIterator<Item = (IpAddr, u8)>) -> LocalAddrs {
        let mut set = LocalAddrs::default();
        for (ip, prefix) in interfaces {
            let ip = canonical_ip(ip);
            set.addrs.insert(ip);
            if let IpAddr::V4(v4) = ip {
                if let Ok(net) = Ipv4Net::new(v4, prefix) {
                    if prefix < 31 {
                        set.broadcasts.insert(IpAddr::V4(net.broadcast()));
                    }
                }
            }
        }
        set
    }

    /// Whether `ip` (canonical) is one of the host's interface addresses.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        self.addrs.contains(&ip)
    }

    /// Whether `ip` (canonical) is the directed broadcast address of a host interface.
    pub fn is_directed_broadcast(&self, ip: IpAddr) -> bool {
        self.broadcasts.contains(&ip)
    }

    /// Number of interface addresses.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// True when no interface address is known.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
}

/// The host's addresses as the policy sees them: shared by every clone of a [`Policy`], so
/// that replacing them ([`Policy::set_local_addrs`]) reaches the control connections and
/// the relay at once. Reads are lock-free.
#[derive(Debug, Clone, Default)]
struct SharedLocal(Arc<ArcSwap<LocalAddrs>>);

impl PartialEq for SharedLocal {
    fn eq(&self, other: &Self) -> bool {
        *self.0.load() == *other.0.load()
    }
}

impl Eq for SharedLocal {}

/// The destination policy: per-user rules, global rules and the built-in default.
///
/// `Policy::default()` has no rules: only the built-in default applies (with no host
/// addresses known until [`Policy::set_local_addrs`] is called).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    global: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    deny_all_by_default: bool,
    local: SharedLocal,
}

impl Policy {
    /// A policy of `global` rules and per-user rules, each list checked in order (first match
    /// wins), with the built-in default behind them.
    pub fn new(global: Vec<Rule>, users: HashMap<String, Vec<Rule>>) -> Policy {
        Policy {
            global,
            users,
            deny_all_by_default: false,
            local: SharedLocal::default(),
        }
    }

    /// Replaces the host's own addresses that the built-in default denies. Every clone of
    /// this policy sees the new set.
    pub fn set_local_addrs(&self, local: LocalAddrs) {
        self.local.0.store(Arc::new(local));
    }

    /// The host's own addresses the built-in default denies now.
    pub fn local_addrs(&self) -> Arc<LocalAddrs> {
        self.local.0.load_full()
    }

    /// With `deny` set, a destination that no rule matches is denied ([`DefaultDeny::All`])
    /// instead of going to the built-in default: the policy becomes an allow-list.
    pub fn deny_by_default(mut self, deny: bool) -> Policy {
        self.deny_all_by_default = deny;
        self
    }

    /// Whether destinations no rule matches are all denied.
    pub fn denies_by_default(&self) -> bool {
        self.deny_all_by_default
    }

    /// The global rules, in the order they are checked.
    pub fn global_rules(&self) -> &[Rule] {
        &self.global
    }

    /// How many users have rules of their own (`[users_policy.NAME]` sections).
    pub fn users_with_rules(&self) -> usize {
        self.users.len()
    }

    /// `user`'s own rules, in the order they are checked (empty if the user has none).
    pub fn user_rules(&self, user: &str) -> &[Rule] {
        self.users.get(user).map_or(&[], Vec::as_slice)
    }

    /// Decides whether `user` (`None` for an anonymous client) may send to `dst`.
    ///
    /// The user's rules are checked first, then the global rules, first match winning in
    /// each; if none matches, the built-in default decides (see [`DEFAULT_POLICY_HELP`]).
    pub fn check(&self, user: Option<&str>, dst: SocketAddr) -> Result<(), Denied> {
        let ip = canonical_ip(dst.ip());
        let port = dst.port();
        let deny = |by| Err(Denied { dst, by });

        if let Some(user) = user {
            let rules = self.user_rules(user);
            if let Some(rule) = rules.iter().find(|r| r.matches_canonical(ip, port)) {
                return match rule.action {
                    Action::Allow => Ok(()),
                    Action::Deny => deny(DeniedBy::UserRule {
                        user: user.to_owned(),
                        rule: rule.clone(),
                    }),
                };
            }
        }
        if let Some(rule) = self.global.iter().find(|r| r.matches_canonical(ip, port)) {
            return match rule.action {
                Action::Allow => Ok(()),
                Action::Deny => deny(DeniedBy::GlobalRule(rule.clone())),
            };
        }
        if self.deny_all_by_default {
            return deny(DeniedBy::Default(DefaultDeny::All));
        }
        match default_denial(ip, &self.local.0.load()) {
            Some(why) => deny(DeniedBy::Default(why)),
            None => Ok(()),
        }
    }
}

pub use crate::net::canonical_ip;

/// The built-in default's verdict on a canonical address, given the host's own addresses.
/// The address classes come first, so a loopback address of the host is reported as
/// loopback; the host's own addresses catch what no class covers (its public addresses).
pub fn default_denial(ip: IpAddr, local: &LocalAddrs) -> Option<DefaultDeny> {
    let class = match ip {
        IpAddr::V4(v4) if v4.is_loopback() => Some(DefaultDeny::Loopback),
        IpAddr::V4(v4) if v4.is_link_local() => Some(DefaultDeny::LinkLocal),
        IpAddr::V4(v4) if v4.is_unspecified() => Some(DefaultDeny::Unspecified),
        // 10/8, 172.16/12, 192.168/16.
        IpAddr::V4(v4) if v4.is_private() => Some(DefaultDeny::Private),
        IpAddr::V4(v4) if is_cgnat(v4) => Some(DefaultDeny::Cgnat),
        IpAddr::V4(v4) if v4.is_multicast() => Some(DefaultDeny::Multicast),
        IpAddr::V4(v4) if v4.is_broadcast() => Some(DefaultDeny::Broadcast),
        IpAddr::V6(v6) if v6.is_loopback() => Some(DefaultDeny::Loopback),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(DefaultDeny::LinkLocal),
        IpAddr::V6(v6) if v6.is_unspecified() => Some(DefaultDeny::Unspecified),
        IpAddr::V6(v6) if v6.is_unique_local() => Some(DefaultDeny::UniqueLocal),
        IpAddr::V6(v6) if v6.is_multicast() => Some(DefaultDeny::Multicast),
        _ => None,
    };
    class.or_else(|| {
        if local.is_directed_broadcast(ip) {
            Some(DefaultDeny::Broadcast)
        } else if local.is_local(ip) {
            Some(DefaultDeny::LocalAddress)
        } else {
            None
        }
    })
}

/// 100.64.0.0/10 (RFC 6598 shared address space).
fn is_cgnat(v4: Ipv4Addr) -> bool {
    let [a, b, ..] = v4.octets();
    a == 100 && (b & 0xc0) == 64
}

/// Splits rule text into a canonical network and an optional port range.
fn parse_target(text: &str) -> Result<(IpNet, Option<(u16, u16)>), RuleProblem> {
    let s = text.trim();
    if s.is_empty() {
        return Err(RuleProblem::Empty);
    }

    // Separate the address from what follows it ("", "/N", "/N:P", ":P").
    let (ip, rest): (IpAddr, &str) = if let Some(inner) = s.strip_prefix('[') {
        let close = inner.find(']').ok_or(RuleProblem::UnclosedBracket)?;
        let addr = &inner[..close];
        let ip = addr
            .parse::<Ipv6Addr>()
            .map_err(|_| RuleProblem::BadAddress(addr.to_owned()))?;
        (IpAddr::V6(ip), &inner[close + 1..])
    } else if let Some(slash) = s.find('/') {
        let addr = &s[..slash];
        let ip = addr
            .parse::<IpAddr>()
            .map_err(|_| RuleProblem::BadAddress(addr.to_owned()))?;
        (ip, &s[slash..])
    } else if let Ok(ip) = s.parse::<IpAddr>() {
        // A bare address, including unbracketed IPv6 such as "::1:80" (read as an address,
        // never as "::1" port 80: brackets are how to say the latter).
        (ip, "")
    } else {
        // Only "a.b.c.d:PORT" is left; more than one colon means a malformed IPv6 address.
        match s.split_once(':') {
            Some((addr, _)) if !s[addr.len() + 1..].contains(':') => {
                let ip = addr
                    .parse::<Ipv4Addr>()
                    .map_err(|_| RuleProblem::BadAddress(addr.to_owned()))?;
                (IpAddr::V4(ip), &s[addr.len()..])
            }
            _ => return Err(RuleProblem::BadAddress(s.to_owned())),
        }
    };

    let (prefix, rest) = match rest.strip_prefix('/') {
        Some(after) => {
            let (len, rest) = after.split_at(after.find(':').unwrap_or(after.len()));
            let len: u8 = digits(len).ok_or_else(|| RuleProblem::BadPrefix(len.to_owned()))?;
            (Some(len), rest)
        }
        None => (None, rest),
    };
    let ports = match rest.strip_prefix(':') {
        Some(ports) => Some(parse_ports(ports)?),
        None if rest.is_empty() => None,
        None => return Err(RuleProblem::Trailing(rest.to_owned())),
    };

    let max = match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    let len = prefix.unwrap_or(max);
    let net = IpNet::new(ip, len).map_err(|_| RuleProblem::PrefixTooLong { len, max })?;
    if net.trunc() != net {
        return Err(RuleProblem::HostBitsSet { network: net.trunc() });
    }
    Ok((canonical_net(net), ports))
}

/// An IPv6 network inside `::ffff:0:0/96` rewritten as the IPv4 network it covers.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => {
                // Invariant: prefix_len is in 96..=128 here, so the IPv4 length is 0..=32.
                let v4 = Ipv4Net::new(v4, v6.prefix_len() - 96).expect("prefix length <= 32");
                IpNet::V4(v4)
            }
            None => net,
        },
        _ => net,
    }
}

/// `"53"` or `"5000-5100"` as an inclusive range.
fn parse_ports(text: &str) -> Result<(u16, u16), RuleProblem> {
    let port = |p: &str| digits::<u16>(p).ok_or_else(|| RuleProblem::BadPort(p.to_owned()));
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => {
            let p = port(text)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(RuleProblem::EmptyPortRange { lo, hi });
    }
    Ok((lo, hi))
}

/// A number written only in ASCII digits (`FromStr` for integers also takes a leading `+`).
fn digits<T: FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn allow(text: &str) -> Rule {
        Rule::parse(Action::Allow, text).unwrap()
    }

    fn deny(text: &str) -> Rule {
        Rule::parse(Action::Deny, text).unwrap()
    }

    fn sa(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn problem(text: &str) -> RuleProblem {
        Rule::parse(Action::Deny, text).unwrap_err().problem
    }

    /// What a reload and `sudp check` read from a policy, and equality (a reload compares
    /// the old policy with the new one): equal exactly when the rules, the default and the
    /// host's addresses are.
    #[test]
    fn accessors_and_equality_say_what_the_policy_holds() {
        let rule = |t: &str| Rule::parse(Action::Allow, t).unwrap();
        let mut users = HashMap::new();
        users.insert("alice".to_string(), vec![rule("10.0.0.0/8")]);
        users.insert("bob".to_string(), vec![]);
        let global = vec![rule("192.0.2.0/24"), rule("198.51.100.7:53")];
        let p = Policy::new(global.clone(), users);
        assert_eq!(p.global_rules(), &global[..]);
        assert_eq!(p.users_with_rules(), 2);
        assert_eq!(p.user_rules("alice"), &[rule("10.0.0.0/8")][..]);
        assert!(!p.denies_by_default());
        let q = p.clone().deny_by_default(true);
        assert!(q.denies_by_default());
        assert_ne!(p, q);
        assert_eq!(p, p.clone());
        assert_eq!(Policy::default().users_with_rules(), 0);

        assert!(LocalAddrs::new([]).is_empty());
        let (a, b) = (Policy::default(), Policy::default());
        assert_eq!(a, b);
        let host = || LocalAddrs::new([("192.0.2.1".parse().unwrap(), 24)]);
        b.set_local_addrs(host());
        assert_ne!(a, b, "the host's addresses are part of the policy");
        a.set_local_addrs(host());
        assert_eq!(a, b);
        assert!(!a.local_addrs().is_empty());
        assert_eq!(a.local_addrs().len(), 1);
    }

    #[test]
    fn parses_every_documented_form() {
        type Case = (&'static str, &'static str, Option<(u16, u16)>);
        let cases: &[Case] = &[
            ("10.0.0.0/8", "10.0.0.0/8", None),
            ("192.0.2.1", "192.0.2.1/32", None),
            ("2001:db8::/32", "2001:db8::/32", None),
            ("[2001:db8::]/32", "2001:db8::/32", None),
            ("2001:db8::1", "2001:db8::1/128", None),
            ("10.0.0.0/8:53", "10.0.0.0/8", Some((53, 53))),
            ("0.0.0.0/0:5000-5100", "0.0.0.0/0", Some((5000, 5100))),
            ("[::1]/128:80", "::1/128", Some((80, 80))),
            ("[2001:db8::1]:443", "2001:db8::1/128", Some((443, 443))),
            ("2001:db8::/32:80", "2001:db8::/32", Some((80, 80))),
            ("192.0.2.1:0-65535", "192.0.2.1/32", Some((0, 65535))),
            ("  10.1.0.0/16  ", "10.1.0.0/16", None),
        ];
        for &(text, net, ports) in cases {
            let rule = allow(text);
            assert_eq!(rule.net, net.parse::<IpNet>().unwrap(), "{text}");
            assert_eq!(rule.ports, ports, "{text}");
            assert_eq!(rule.action, Action::Allow);
        }
    }

    #[test]
    fn mapped_rule_networks_become_ipv4() {
        assert_eq!(deny("::ffff:127.0.0.0/104").net, "127.0.0.0/8".parse().unwrap());
        assert_eq!(deny("[::ffff:10.0.0.1]:53").net, "10.0.0.1/32".parse().unwrap());
        assert_eq!(deny("::ffff:0:0/96").net, "0.0.0.0/0".parse().unwrap());
        // Wider than the mapped range: stays IPv6.
        assert_eq!(deny("::/0").net, "::/0".parse().unwrap());
        // IPv4-compatible (deprecated) is not unwrapped.
        assert_eq!(deny("::7f00:1").net, "::7f00:1/128".parse().unwrap());
    }

    #[test]
    fn parse_errors_name_the_rule_and_the_problem() {
        assert_eq!(problem(""), RuleProblem::Empty);
        assert_eq!(problem("foo"), RuleProblem::BadAddress("foo".into()));
        assert_eq!(problem("10.0.0/8"), RuleProblem::BadAddress("10.0.0".into()));
        assert_eq!(problem("[::1/128"), RuleProblem::UnclosedBracket);
        assert_eq!(
            problem("[10.0.0.1]:80"),
            RuleProblem::BadAddress("10.0.0.1".into())
        );
        assert_eq!(problem("10.0.0.0/x"), RuleProblem::BadPrefix("x".into()));
        assert_eq!(problem("10.0.0.0/+8"), RuleProblem::BadPrefix("+8".into()));
        assert_eq!(problem("10.0.0.0/"), RuleProblem::BadPrefix("".into()));
        assert_eq!(
            problem("10.0.0.0/33"),
            RuleProblem::PrefixTooLong { len: 33, max: 32 }
        );
        assert_eq!(
            problem("::/129"),
            RuleProblem::PrefixTooLong { len: 129, max: 128 }
        );
        assert_eq!(
            problem("10.0.0.1/8"),
            RuleProblem::HostBitsSet {
                network: "10.0.0.0/8".parse().unwrap()
            }
        );
        assert_eq!(problem("10.0.0.0/8:http"), RuleProblem::BadPort("http".into()));
        assert_eq!(problem("10.0.0.0/8:65536"), RuleProblem::BadPort("65536".into()));
        assert_eq!(problem("10.0.0.0/8:"), RuleProblem::BadPort("".into()));
        assert_eq!(problem("10.0.0.0/8:5-"), RuleProblem::BadPort("".into()));
        assert_eq!(
            problem("10.0.0.0/8:100-99"),
            RuleProblem::EmptyPortRange { lo: 100, hi: 99 }
        );
        assert_eq!(problem("[::1]x"), RuleProblem::Trailing("x".into()));
        assert_eq!(problem("::1:80:x"), RuleProblem::BadAddress("::1:80:x".into()));

        let err = Rule::parse(Action::Allow, "10.0.0.0/33").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid rule \"10.0.0.0/33\": prefix length 33 is longer than 32"
        );
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "allow 10.0.0.0/8",
            "deny 192.0.2.1/32:53",
            "allow 0.0.0.0/0:5000-5100",
            "deny [::1]/128:80",
            "allow 2001:db8::/32",
        ] {
            let (action, target) = text.split_once(' ').unwrap();
            let action = if action == "allow" {
                Action::Allow
            } else {
                Action::Deny
            };
            let rule = Rule::parse(action, target).unwrap();
            assert_eq!(rule.to_string(), text);
        }
    }

    #[test]
    fn default_denies_every_non_public_class() {
        let policy = Policy::default();
        for (dst, why) in [
            ("127.0.0.1:80", DefaultDeny::Loopback),
            ("127.255.0.9:53", DefaultDeny::Loopback),
            ("[::1]:80", DefaultDeny::Loopback),
            ("[::ffff:127.0.0.1]:80", DefaultDeny::Loopback),
            ("169.254.169.254:80", DefaultDeny::LinkLocal),
            ("[fe80::1]:80", DefaultDeny::LinkLocal),
            ("[febf::1]:80", DefaultDeny::LinkLocal),
            ("[::ffff:169.254.1.1]:80", DefaultDeny::LinkLocal),
            ("0.0.0.0:80", DefaultDeny::Unspecified),
            ("[::]:80", DefaultDeny::Unspecified),
            ("[::ffff:0.0.0.0]:80", DefaultDeny::Unspecified),
            // Private (RFC 1918), both ends of each block.
            ("10.0.0.0:1", DefaultDeny::Private),
            ("10.255.255.255:1", DefaultDeny::Private),
            ("172.16.0.0:1", DefaultDeny::Private),
            ("172.31.255.255:1", DefaultDeny::Private),
            ("192.168.0.0:1", DefaultDeny::Private),
            ("192.168.255.255:1", DefaultDeny::Private),
            ("[::ffff:10.1.2.3]:1", DefaultDeny::Private),
            ("[::ffff:192.168.1.1]:1", DefaultDeny::Private),
            // CGNAT (RFC 6598).
            ("100.64.0.0:1", DefaultDeny::Cgnat),
            ("100.127.255.255:1", DefaultDeny::Cgnat),
            ("[::ffff:100.100.100.100]:1", DefaultDeny::Cgnat),
            // Unique-local (RFC 4193).
            ("[fc00::]:1", DefaultDeny::UniqueLocal),
            (
                "[fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:1",
                DefaultDeny::UniqueLocal,
            ),
            // Multicast.
            ("224.0.0.0:1", DefaultDeny::Multicast),
            ("239.255.255.255:1", DefaultDeny::Multicast),
            ("[::ffff:224.0.0.251]:5353", DefaultDeny::Multicast),
            ("[ff00::]:1", DefaultDeny::Multicast),
            ("[ff02::fb]:5353", DefaultDeny::Multicast),
            (
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:1",
                DefaultDeny::Multicast,
            ),
            // Limited broadcast.
            ("255.255.255.255:67", DefaultDeny::Broadcast),
            ("[::ffff:255.255.255.255]:67", DefaultDeny::Broadcast),
        ] {
            let err = policy.check(None, sa(dst)).unwrap_err();
            assert_eq!(err.by, DeniedBy::Default(why), "{dst}");
            assert_eq!(err.dst, sa(dst));
        }
        // The other side of every boundary is an ordinary public address.
        for dst in [
            "192.0.2.1:80",
            "9.255.255.255:1",
            "11.0.0.0:1",
            "172.15.255.255:1",
            "172.32.0.0:1",
            "192.167.255.255:1",
            "192.169.0.0:1",
            "100.63.255.255:1",
            "100.128.0.0:1",
            "223.255.255.255:1",
            "240.0.0.0:1",
            "255.255.255.254:1",
            "126.255.255.255:1",
            "128.0.0.0:1",
            "169.253.255.255:1",
            "169.255.0.0:1",
            "0.0.0.1:1",
            "[2001:db8::1]:443",
            "[fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:1",
            "[fe00::]:1",
            "[fec0::1]:80",
            "[feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:1",
            "[::ffff:192.0.2.1]:80",
            "[::ffff:172.15.255.255]:80",
            // IPv4-compatible, not mapped: an ordinary (unroutable) IPv6 address.
            "[::7f00:1]:80",
        ] {
            assert_eq!(policy.check(None, sa(dst)), Ok(()), "{dst}");
        }
    }

    #[test]
    fn default_denies_the_hosts_own_addresses_and_directed_broadcasts() {
        let policy = Policy::default();
        let ifaces: [(IpAddr, u8); 4] = [
            ("127.0.0.1".parse().unwrap(), 8),
            ("198.51.100.7".parse().unwrap(), 24),
            ("2001:db8::7".parse().unwrap(), 64),
            ("203.0.113.9".parse().unwrap(), 31),
        ];
        // Before the host's addresses are known they are ordinary public addresses.
        assert_eq!(policy.check(None, sa("198.51.100.7:22")), Ok(()));
        let clone = policy.clone();
        policy.set_local_addrs(LocalAddrs::new(ifaces));
        assert_eq!(policy.local_addrs().len(), 4);
        for p in [&policy, &clone] {
            for (dst, why) in [
                ("198.51.100.7:22", DefaultDeny::LocalAddress),
                ("[::ffff:198.51.100.7]:22", DefaultDeny::LocalAddress),
                ("[2001:db8::7]:22", DefaultDeny::LocalAddress),
                ("203.0.113.9:22", DefaultDeny::LocalAddress),
                ("198.51.100.255:9", DefaultDeny::Broadcast),
                ("[::ffff:198.51.100.255]:9", DefaultDeny::Broadcast),
                // The classes win over the host's own addresses.
                ("127.0.0.1:22", DefaultDeny::Loopback),
            ] {
                let err = p.check(None, sa(dst)).unwrap_err();
                assert_eq!(err.by, DeniedBy::Default(why), "{dst}");
            }
            // Neighbours on the same networks are not the host; a /31 has no broadcast.
            for dst in [
                "198.51.100.8:22",
                "198.51.100.0:22",
                "203.0.113.8:1",
                "[2001:db8::8]:22",
            ] {
                assert_eq!(p.check(None, sa(dst)), Ok(()), "{dst}");
            }
        }
        // An allow rule opens the host's own address, as any other default denial.
        let open = Policy::new(vec![allow("198.51.100.7/32:53")], HashMap::new());
        open.set_local_addrs(LocalAddrs::new(ifaces));
        assert_eq!(open.check(None, sa("198.51.100.7:53")), Ok(()));
        assert!(open.check(None, sa("198.51.100.7:54")).is_err());
        let err = Policy::default();
        err.set_local_addrs(LocalAddrs::new(ifaces));
        assert_eq!(
            err.check(None, sa("198.51.100.7:22")).unwrap_err().to_string(),
            "destination 198.51.100.7:22 denied by the default policy: \
             an address of the gateway host itself"
        );
    }

    #[test]
    fn allow_rules_open_each_default_class() {
        let policy = Policy::new(
            vec![
                allow("10.0.0.0/8"),
                allow("172.16.0.0/12:53"),
                allow("100.64.0.0/10"),
                allow("fc00::/7"),
                allow("224.0.0.0/4"),
            ],
            HashMap::new(),
        );
        assert_eq!(policy.check(None, sa("10.9.9.9:1")), Ok(()));
        assert_eq!(policy.check(None, sa("172.20.0.1:53")), Ok(()));
        assert!(policy.check(None, sa("172.20.0.1:54")).is_err());
        assert_eq!(policy.check(None, sa("100.64.1.1:1")), Ok(()));
        assert_eq!(policy.check(None, sa("[fd00::1]:1")), Ok(()));
        assert_eq!(policy.check(None, sa("239.1.1.1:1")), Ok(()));
        assert!(policy.check(None, sa("192.168.1.1:1")).is_err());
    }

    #[test]
    fn denial_message_names_the_reason() {
        let err = Policy::default().check(None, sa("127.0.0.1:80")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "destination 127.0.0.1:80 denied by the default policy: \
             loopback address (127.0.0.0/8, ::1)"
        );
        let policy = Policy::new(vec![deny("10.0.0.0/8")], HashMap::new());
        let err = policy.check(Some("bob"), sa("10.1.2.3:5")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "destination 10.1.2.3:5 denied by global rule `deny 10.0.0.0/8`"
        );
    }

    #[test]
    fn explicit_allow_overrides_the_default() {
        let policy = Policy::new(vec![allow("127.0.0.0/8")], HashMap::new());
        assert_eq!(policy.check(None, sa("127.0.0.1:9")), Ok(()));
        // The mapped form is the same destination.
        assert_eq!(policy.check(None, sa("[::ffff:127.0.0.1]:9")), Ok(()));
        // Only what the rule covers.
        assert!(policy.check(None, sa("[::1]:9")).is_err());
        assert!(policy.check(None, sa("169.254.0.1:9")).is_err());
    }

    #[test]
    fn first_match_wins_so_deny_before_allow_carves_out() {
        let rules = vec![deny("10.0.0.5"), allow("10.0.0.0/8"), deny("0.0.0.0/0")];
        let policy = Policy::new(rules, HashMap::new());
        let err = policy.check(None, sa("10.0.0.5:1")).unwrap_err();
        assert_eq!(err.by, DeniedBy::GlobalRule(deny("10.0.0.5")));
        assert_eq!(policy.check(None, sa("10.0.0.6:1")), Ok(()));
        let err = policy.check(None, sa("192.0.2.1:1")).unwrap_err();
        assert_eq!(err.by, DeniedBy::GlobalRule(deny("0.0.0.0/0")));

        // The same rules the other way round: the allow shadows the deny.
        let rules = vec![allow("10.0.0.0/8"), deny("10.0.0.5")];
        let policy = Policy::new(rules, HashMap::new());
        assert_eq!(policy.check(None, sa("10.0.0.5:1")), Ok(()));
    }

    #[test]
    fn user_rules_precede_global_rules() {
        let users = HashMap::from([
            ("alice".to_owned(), vec![allow("10.0.0.0/8")]),
            ("mallory".to_owned(), vec![deny("192.0.2.0/24")]),
        ]);
        let policy = Policy::new(vec![deny("10.0.0.0/8")], users);
        assert_eq!(policy.check(Some("alice"), sa("10.1.1.1:80")), Ok(()));
        let err = policy.check(Some("bob"), sa("10.1.1.1:80")).unwrap_err();
        assert_eq!(err.by, DeniedBy::GlobalRule(deny("10.0.0.0/8")));
        assert!(policy.check(None, sa("10.1.1.1:80")).is_err());

        let err = policy.check(Some("mallory"), sa("192.0.2.7:80")).unwrap_err();
        assert_eq!(
            err.by,
            DeniedBy::UserRule {
                user: "mallory".into(),
                rule: deny("192.0.2.0/24")
            }
        );
        assert!(err.to_string().contains("of user \"mallory\""));
        assert_eq!(policy.check(Some("alice"), sa("192.0.2.7:80")), Ok(()));
        // A user's rules fall through to the global ones, then the default.
        assert!(policy.check(Some("alice"), sa("127.0.0.1:80")).is_err());
        assert_eq!(policy.user_rules("alice"), &[allow("10.0.0.0/8")]);
        assert!(policy.user_rules("nobody").is_empty());
    }

    #[test]
    fn port_ranges_are_inclusive() {
        let policy = Policy::new(
            vec![allow("192.0.2.0/24:5000-5100"), deny("192.0.2.0/24")],
            HashMap::new(),
        );
        assert!(policy.check(None, sa("192.0.2.1:4999")).is_err());
        assert_eq!(policy.check(None, sa("192.0.2.1:5000")), Ok(()));
        assert_eq!(policy.check(None, sa("192.0.2.1:5050")), Ok(()));
        assert_eq!(policy.check(None, sa("192.0.2.1:5100")), Ok(()));
        assert!(policy.check(None, sa("192.0.2.1:5101")).is_err());

        let single = deny("[2001:db8::]/32:53");
        assert!(single.matches(sa("[2001:db8::9]:53")));
        assert!(!single.matches(sa("[2001:db8::9]:54")));
        assert!(!single.matches(sa("192.0.2.1:53")));
    }

    #[test]
    fn deny_by_default_makes_an_allow_list() {
        let policy = Policy::new(vec![allow("192.0.2.0/24")], HashMap::new()).deny_by_default(true);
        assert!(policy.denies_by_default());
        assert_eq!(policy.check(None, sa("192.0.2.9:1")), Ok(()));
        let err = policy.check(None, sa("198.51.100.1:1")).unwrap_err();
        assert_eq!(err.by, DeniedBy::Default(DefaultDeny::All));
    }

    #[test]
    fn ipv6_rules_do_not_match_mapped_destinations() {
        let policy = Policy::new(vec![deny("::/0")], HashMap::new());
        assert_eq!(policy.check(None, sa("[::ffff:192.0.2.1]:80")), Ok(()));
        assert!(policy.check(None, sa("[2001:db8::1]:80")).is_err());
    }

    fn any_rule() -> impl Strategy<Value = Rule> {
        let net = prop_oneof![
            (any::<u32>(), 0u8..=32)
                .prop_map(|(a, len)| { IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), len).unwrap().trunc()) }),
            (any::<u128>(), 0u8..=128).prop_map(|(a, len)| {
                let net = IpNet::new(IpAddr::V6(Ipv6Addr::from(a)), len).unwrap();
                canonical_net(net.trunc())
            }),
        ];
        let ports =
            proptest::option::of((any::<u16>(), any::<u16>()).prop_map(|(a, b)| (a.min(b), a.max(b))));
        let action = prop_oneof![Just(Action::Allow), Just(Action::Deny)];
        (action, net, ports).prop_map(|(action, net, ports)| Rule { action, net, ports })
    }

    proptest! {
        #[test]
        fn mapped_destinations_are_checked_as_ipv4(
            rules in proptest::collection::vec(any_rule(), 0..6),
            v4 in any::<u32>(),
            port in any::<u16>(),
        ) {
            let policy = Policy::new(rules, HashMap::new());
            let v4 = Ipv4Addr::from(v4);
            let plain = SocketAddr::new(IpAddr::V4(v4), port);
            let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port);
            let a = policy.check(None, plain).map_err(|d| d.by);
            let b = policy.check(None, mapped).map_err(|d| d.by);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn display_then_parse_is_identity(rule in any_rule()) {
            let text = rule.to_string();
            let target = text.split_once(' ').unwrap().1;
            prop_assert_eq!(Rule::parse(rule.action, target), Ok(rule));
        }

        #[test]
        fn parse_never_panics_and_errors_quote_the_text(text in "\\PC{0,40}") {
            match Rule::parse(Action::Deny, &text) {
                Ok(rule) => prop_assert_eq!(rule.net.trunc(), rule.net),
                Err(e) => prop_assert_eq!(e.rule, text),
            }
        }
    }

    /// A rule matches exactly the destinations in its network and port range. Half the
    /// addresses are drawn inside the rule's network (host bits random), half anywhere in
    /// either family, and the port is drawn inside or outside the range, so all four
    /// combinations occur: counted, each must be reached (the outside branch as well).
    #[test]
    fn a_rule_matches_exactly_its_net_and_ports() {
        use crate::proto::testing::{assert_reached, counted};
        let strategy = (
            any_rule(),
            any::<u128>(),
            any::<bool>(),
            any::<bool>(),
            any::<u16>(),
        );
        let counts = counted(2000, strategy, |(rule, a, inside, v4, port)| {
            let ip = if inside {
                match rule.net {
                    IpNet::V4(n) => {
                        let host = (a as u32) & u32::from(n.hostmask());
                        IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
                    }
                    IpNet::V6(n) => {
                        let host = a & u128::from(n.hostmask());
                        canonical_ip(IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host)))
                    }
                }
            } else if v4 {
                IpAddr::V4(Ipv4Addr::from(a as u32))
            } else {
                canonical_ip(IpAddr::V6(Ipv6Addr::from(a)))
            };
            let dst = SocketAddr::new(ip, port);
            let in_net = rule.net.contains(&ip);
            let in_ports = rule.ports.is_none_or(|(lo, hi)| lo <= port && port <= hi);
            prop_assert_eq!(rule.matches(dst), in_net && in_ports);
            // The same destination written as an IPv4-mapped IPv6 address matches alike.
            if let IpAddr::V4(v4) = ip {
                let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port);
                prop_assert_eq!(rule.matches(mapped), rule.matches(dst));
            }
            Ok(match (in_net, in_ports) {
                (true, true) => "inside net, inside ports",
                (true, false) => "inside net, outside ports",
                (false, true) => "outside net, inside ports",
                (false, false) => "outside net, outside ports",
            })
        });
        assert_reached(
            &counts,
            &[
                "inside net, inside ports",
                "inside net, outside ports",
                "outside net, inside ports",
                "outside net, outside ports",
            ],
            20,
        );
    }
}
