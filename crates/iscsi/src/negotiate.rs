//! Operational parameter negotiation (RFC 7143 §13): every standard key with its rule
//! (list, boolean OR/AND, numerical minimum/maximum, declarative), and the answers a
//! target gives to keys it does not know.

use crate::text::Pairs;

/// The limits this target offers.
pub mod ours {
    /// Largest data segment this target receives.
    pub const MAX_RECV_DATA_SEGMENT_LENGTH: u32 = 256 << 10;
    /// Largest unsolicited burst (immediate plus unsolicited Data-Out).
    pub const FIRST_BURST_LENGTH: u32 = 256 << 10;
    /// Largest solicited burst (one R2T).
    pub const MAX_BURST_LENGTH: u32 = 1 << 20;
    /// R2Ts outstanding per task.
    pub const MAX_OUTSTANDING_R2T: u32 = 1;
    /// Seconds an initiator waits before reconnecting after a logout.
    pub const DEFAULT_TIME2WAIT: u32 = 2;
    /// Seconds a session survives its connection: none at ErrorRecoveryLevel 0.
    pub const DEFAULT_TIME2RETAIN: u32 = 0;
}

/// The operational parameters in force on a connection and its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parameters {
    /// CRC32C header digests.
    pub header_digest: bool,
    /// CRC32C data digests.
    pub data_digest: bool,
    /// Largest data segment this target accepts (it declared this).
    pub max_recv_data_segment_length: u32,
    /// Largest data segment the initiator accepts (it declared this): caps Data-In PDUs.
    pub max_send_data_segment_length: u32,
    /// Writes wait for an R2T before any unsolicited Data-Out.
    pub initial_r2t: bool,
    /// Writes may carry data in the command PDU.
    pub immediate_data: bool,
    /// Largest unsolicited data per command.
    pub first_burst_length: u32,
    /// Largest data per R2T, and per Data-In sequence.
    pub max_burst_length: u32,
    /// R2Ts outstanding per task.
    pub max_outstanding_r2t: u32,
    /// Data PDUs within a sequence arrive in offset order.
    pub data_pdu_in_order: bool,
    /// Sequences arrive in offset order.
    pub data_sequence_in_order: bool,
    /// Always 0: errors end the connection.
    pub error_recovery_level: u32,
    /// Seconds to wait before reconnecting.
    pub default_time2wait: u32,
    /// Seconds a session outlives its connection.
    pub default_time2retain: u32,
    /// Connections per session.
    pub max_connections: u32,
}

impl Default for Parameters {
    /// The RFC's defaults, in force until negotiated.
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: 8192,
            max_send_data_segment_length: 8192,
            initial_r2t: true,
            immediate_data: true,
            first_burst_length: 65536,
            max_burst_length: 262144,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            default_time2wait: 2,
            default_time2retain: 20,
            max_connections: 1,
        }
    }
}

/// Keys handled elsewhere (login identity, security) that the operational negotiation
/// leaves alone.
const LOGIN_KEYS: &[&str] = &[
    "InitiatorName",
    "InitiatorAlias",
    "TargetName",
    "SessionType",
    "AuthMethod",
    "CHAP_A",
    "CHAP_I",
    "CHAP_C",
    "CHAP_N",
    "CHAP_R",
];

/// Keys the initiator may not send (target-declared).
const TARGET_ONLY: &[&str] = &["TargetAlias", "TargetAddress", "TargetPortalGroupTag"];

fn boolean(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(value: bool) -> &'static str {
    if value { "Yes" } else { "No" }
}

fn number(value: &str, min: u32, max: u32) -> Option<u32> {
    let n = if let Some(hex) = value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        value.parse::<u64>().ok()?
    };
    u32::try_from(n).ok().filter(|n| (min..=max).contains(n))
}

/// Picks the first digest in the initiator's list that this target supports.
fn digest(value: &str) -> Option<bool> {
    value.split(',').find_map(|d| match d {
        "None" => Some(false),
        "CRC32C" => Some(true),
        _ => None,
    })
}

impl Parameters {
    /// Negotiates the operational keys in `offered`, answering each in `answer`. Keys the
    /// target does not know are answered NotUnderstood; values out of range, Reject.
    /// `declared` remembers which declarative keys this target has sent already.
    pub fn negotiate(&mut self, offered: &Pairs, answer: &mut Pairs, declared: &mut bool) {
        for (key, value) in &offered.0 {
            let key = key.as_str();
            if LOGIN_KEYS.contains(&key) {
                continue;
            }
            let reply: String = match key {
                "HeaderDigest" | "DataDigest" => match digest(value) {
                    Some(on) => {
                        if key == "HeaderDigest" {
                            self.header_digest = on;
                        } else {
                            self.data_digest = on;
                        }
                        (if on { "CRC32C" } else { "None" }).into()
                    }
                    None => "Reject".into(),
                },
                "MaxRecvDataSegmentLength" => match number(value, 512, 0x00ff_ffff) {
                    Some(n) => {
                        // Declarative: the initiator's own limit; ours is declared below.
                        self.max_send_data_segment_length = n;
                        continue;
                    }
                    None => "Reject".into(),
                },
                "InitialR2T" => match boolean(value) {
                    // OR: Yes if either side wants it; this target does not.
                    Some(v) => {
                        self.initial_r2t = v;
                        yes_no(v).into()
                    }
                    None => "Reject".into(),
                },
                "ImmediateData" => match boolean(value) {
                    // AND: this target takes immediate data.
                    Some(v) => {
                        self.immediate_data = v;
                        yes_no(v).into()
                    }
                    None => "Reject".into(),
                },
                "DataPDUInOrder" | "DataSequenceInOrder" => match boolean(value) {
                    // OR: this target wants data in order, so the answer is Yes.
                    Some(_) => "Yes".into(),
                    None => "Reject".into(),
                },
                "FirstBurstLength" => match number(value, 512, 0x00ff_ffff) {
                    Some(n) => {
                        self.first_burst_length = n.min(ours::FIRST_BURST_LENGTH);
                        self.first_burst_length.to_string()
                    }
                    None => "Reject".into(),
                },
                "MaxBurstLength" => match number(value, 512, 0x00ff_ffff) {
                    Some(n) => {
                        self.max_burst_length = n.min(ours::MAX_BURST_LENGTH);
                        self.max_burst_length.to_string()
                    }
                    None => "Reject".into(),
                },
                "MaxOutstandingR2T" => match number(value, 1, 65535) {
                    Some(n) => {
                        self.max_outstanding_r2t = n.min(ours::MAX_OUTSTANDING_R2T);
                        self.max_outstanding_r2t.to_string()
                    }
                    None => "Reject".into(),
                },
                "ErrorRecoveryLevel" => match number(value, 0, 2) {
                    Some(_) => "0".into(),
                    None => "Reject".into(),
                },
                "DefaultTime2Wait" => match number(value, 0, 3600) {
                    Some(n) => {
                        self.default_time2wait = n.max(ours::DEFAULT_TIME2WAIT);
                        self.default_time2wait.to_string()
                    }
                    None => "Reject".into(),
                },
                "DefaultTime2Retain" => match number(value, 0, 3600) {
                    Some(_) => {
                        // The minimum of both; this target's is 0 (no session outlives
                        // its connection at ErrorRecoveryLevel 0).
                        self.default_time2retain = ours::DEFAULT_TIME2RETAIN;
                        self.default_time2retain.to_string()
                    }
                    None => "Reject".into(),
                },
                "MaxConnections" => match number(value, 1, 65535) {
                    Some(_) => "1".into(),
                    None => "Reject".into(),
                },
                "IFMarker" | "OFMarker" => match boolean(value) {
                    Some(_) => "No".into(),
                    None => "Reject".into(),
                },
                "IFMarkInt" | "OFMarkInt" => "Irrelevant".into(),
                k if TARGET_ONLY.contains(&k) => "Reject".into(),
                _ => "NotUnderstood".into(),
            };
            answer.push(key, reply);
        }
        // A burst cannot be larger than the largest burst.
        self.first_burst_length = self.first_burst_length.min(self.max_burst_length);
        if !*declared {
            *declared = true;
            self.max_recv_data_segment_length = ours::MAX_RECV_DATA_SEGMENT_LENGTH;
            answer.push("MaxRecvDataSegmentLength", ours::MAX_RECV_DATA_SEGMENT_LENGTH.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(offer: &[(&str, &str)]) -> (Parameters, Pairs) {
        let offered = Pairs(offer.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        let mut params = Parameters::default();
        let mut answer = Pairs::default();
        params.negotiate(&offered, &mut answer, &mut false);
        (params, answer)
    }

    #[test]
    fn applies_each_rule() {
        let (p, a) = run(&[
            ("HeaderDigest", "CRC32C,None"),
            ("DataDigest", "None,CRC32C"),
            ("MaxRecvDataSegmentLength", "65536"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("FirstBurstLength", "4194304"),
            ("MaxBurstLength", "16776192"),
            ("MaxOutstandingR2T", "8"),
            ("ErrorRecoveryLevel", "2"),
            ("DefaultTime2Wait", "0"),
            ("DefaultTime2Retain", "20"),
            ("MaxConnections", "4"),
            ("X-com.example.Frob", "1"),
            ("MaxBurstLength", "huge"),
        ]);
        assert!(p.header_digest && !p.data_digest);
        assert_eq!(p.max_send_data_segment_length, 65536);
        assert!(!p.initial_r2t && p.immediate_data);
        assert_eq!(
            (p.first_burst_length, p.max_burst_length),
            (ours::FIRST_BURST_LENGTH, ours::MAX_BURST_LENGTH)
        );
        assert_eq!(a.get("MaxOutstandingR2T"), Some("1"));
        assert_eq!(a.get("ErrorRecoveryLevel"), Some("0"));
        assert_eq!(a.get("DefaultTime2Wait"), Some("2"));
        assert_eq!(a.get("DefaultTime2Retain"), Some("0"));
        assert_eq!(a.get("MaxConnections"), Some("1"));
        assert_eq!(a.get("X-com.example.Frob"), Some("NotUnderstood"));
        assert_eq!(a.0.iter().filter(|(k, v)| k == "MaxBurstLength" && v == "Reject").count(), 1);
        assert_eq!(a.get("MaxRecvDataSegmentLength"), Some("262144"));
    }

    #[test]
    fn first_burst_never_exceeds_max_burst() {
        let (p, _) = run(&[("FirstBurstLength", "262144"), ("MaxBurstLength", "4096")]);
        assert_eq!((p.first_burst_length, p.max_burst_length), (4096, 4096));
    }
}
