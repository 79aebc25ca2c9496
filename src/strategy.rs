//! How key material can move from one member to another, and which way a
//! group takes for each pair of members and kind of key: Luna cloning
//! (`CA_MigrateKeys` / `CA_CloneObject`) between partitions of one Luna
//! library instance, or wrapping under the domain key with a key-wrap
//! mechanism both members list. Owns what a member can do (found when it
//! is attached) and the choice; `replication` carries the key.

use crate::error::Result;
use crate::mechanism::BareMechanism;
use crate::member::padded_to_string;
use crate::member_api::{same_library, MemberBackend};
use cryptoki_sys::*;

/// Luna's vendor AES key wrap with padding (RFC 5649); whether Luna also
/// takes the standard `CKM_AES_KEY_WRAP_PAD` is undocumented.
pub const CKM_AES_KWP: CK_MECHANISM_TYPE = 0x8000_0171;

/// Key-wrap mechanisms that carry secret keys and PKCS#8 private keys, in
/// order of preference.
const WRAP_MECHANISMS: [CK_MECHANISM_TYPE; 2] = [CKM_AES_KEY_WRAP_PAD, CKM_AES_KWP];

/// How Luna's client library describes the virtual slot of one of its own
/// HA groups.
pub const LUNA_HA_SLOT_DESCRIPTION: &str = "HA Virtual Card Slot";

/// Luna's partition policies 0 and 1.
const POLICY_PRIVATE_KEY_CLONING: CK_ULONG = 0;
const POLICY_PRIVATE_KEY_WRAPPING: CK_ULONG = 1;

/// Luna's cloning entry points a library exports.
#[derive(Clone, Copy)]
pub struct Cloning {
    /// `CA_MigrateKeys`.
    pub migrate: bool,
    /// `CA_CloneObject`.
    pub clone: bool,
}

/// What a member can do to move keys, found when it is attached.
#[derive(Clone, Copy, Default)]
pub struct Capabilities {
    /// Luna's cloning entry points, where the library exports them.
    pub cloning: Option<Cloning>,
    /// Whether the library is Luna's (it exports `CA_GetFunctionList`).
    pub luna: bool,
    /// Luna partition policy 0, "Allow private key cloning"; false for
    /// other members, which cannot clone.
    pub private_key_cloning: bool,
    /// Luna partition policy 1, "Allow private key wrapping"; always true
    /// for other members, whose keys' own attributes decide.
    pub private_key_wrapping: bool,
    /// Whether the two policies were read (else Luna's defaults are
    /// assumed until a probe confirms them: [`Probes`]).
    pub policies_read: bool,
    /// The key-wrap mechanisms it lists and takes, in [`WRAP_MECHANISMS`]
    /// order.
    wrap_mechanisms: [Option<CK_MECHANISM_TYPE>; 2],
    /// Whether its library refused a key-wrap mechanism it lists (p11-kit
    /// 0.24's client cannot carry one): it can never receive a key that
    /// moves by wrapping. Kept while the member is down.
    pub wrap_refused: bool,
    /// Its mechanisms could not be listed when it was first attached: what
    /// it can do is not known, and is read again before a key moves to or
    /// from it (`Group::list_again`).
    pub unlisted: bool,
}

/// The way a key moves from one member to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Luna cloning within one library instance.
    Clone,
    /// Wrapped under the domain key with this mechanism, unwrapped on the
    /// target.
    Wrap(CK_MECHANISM_TYPE),
}

impl Capabilities {
    /// Reads what the member in `slot` of `library` can do. Luna's policies
    /// come from `CA_GetContainerPolicySetting`; where it is absent or
    /// fails, a Luna partition is taken to have Luna's defaults (private
    /// keys clone and are never wrapped) until a probe says otherwise.
    /// `Err` where its mechanisms cannot be listed: what it can do is not
    /// known then. (Taken for "no key-wrap mechanism", a member whose
    /// listing failed once as it reconnected could receive no generated
    /// key for the rest of its epoch: simulation seed 31548.)
    pub fn detect(library: &dyn MemberBackend, slot: CK_SLOT_ID) -> Result<Capabilities> {
        let listed = library.mechanisms(slot)?;
        Ok(Capabilities::from_list(library, slot, &listed))
    }

    /// [`Capabilities::detect`] with the mechanisms `listed` in the slot.
    pub fn from_list(
        library: &dyn MemberBackend,
        slot: CK_SLOT_ID,
        listed: &[CK_MECHANISM_TYPE],
    ) -> Capabilities {
        let extensions = library.luna_extensions();
        let (migrate, clone) = (extensions.migrate_keys, extensions.clone_object);
        let cloning = (migrate || clone).then_some(Cloning { migrate, clone });
        let is_luna = extensions.luna || cloning.is_some();
        let read_policy = |id: CK_ULONG| {
            if !extensions.container_policy {
                return None;
            }
            let mut value: CK_ULONG = 0;
            let rv = library.container_policy(slot, id, &mut value);
            (rv == CKR_OK).then_some(value != 0)
        };
        let mut wrap_mechanisms = [None; 2];
        let mut wrap_refused = false;
        for (found, mechanism) in wrap_mechanisms.iter_mut().zip(WRAP_MECHANISMS) {
            if listed.contains(&mechanism) {
                // Luna's client carries what it lists; the probe is for
                // libraries that forward calls elsewhere.
                if !is_luna && refuses_to_wrap_with(library, slot, mechanism) {
                    wrap_refused = true;
                } else {
                    *found = Some(mechanism);
                }
            }
        }
        let (cloning_policy, wrapping_policy) = if is_luna {
            (
                read_policy(POLICY_PRIVATE_KEY_CLONING),
                read_policy(POLICY_PRIVATE_KEY_WRAPPING),
            )
        } else {
            (Some(false), Some(true))
        };
        Capabilities {
            cloning,
            luna: is_luna,
            private_key_cloning: cloning_policy.unwrap_or(true),
            private_key_wrapping: wrapping_policy.unwrap_or(false),
            policies_read: cloning_policy.is_some() && wrapping_policy.is_some(),
            wrap_mechanisms,
            wrap_refused,
            unlisted: false,
        }
    }

    /// What is known of a member whose mechanisms could not be listed:
    /// Luna's extensions, and no key-wrap mechanism until they are read
    /// again.
    pub fn unlisted(library: &dyn MemberBackend, slot: CK_SLOT_ID) -> Capabilities {
        Capabilities {
            unlisted: true,
            ..Capabilities::from_list(library, slot, &[])
        }
    }

    /// Whether it was found to move no key by wrapping because its library
    /// refuses every key-wrap mechanism it lists.
    pub fn refuses_wrapping(&self) -> bool {
        self.wrap_refused && self.wrap_mechanisms.iter().all(Option::is_none)
    }

    /// The partition turned out not to clone private keys (a probe was
    /// refused): it is taken for Key Export mode, Luna's other mode.
    pub fn refuses_private_key_cloning(&mut self) {
        self.private_key_cloning = false;
        self.private_key_wrapping = true;
    }

    /// One line for the HA log: how this member can move keys.
    pub fn describe(&self) -> String {
        let wrap: Vec<String> = self
            .wrap_mechanisms
            .iter()
            .flatten()
            .map(|m| mechanism_name(*m))
            .collect();
        let wrap = if self.unlisted {
            "its mechanisms could not be listed yet".to_string()
        } else if wrap.is_empty() && self.wrap_refused {
            "its library refuses the key-wrap mechanism it lists".to_string()
        } else if wrap.is_empty() {
            "no key-wrap mechanism".to_string()
        } else {
            format!("wraps with {}", wrap.join(", "))
        };
        match (self.luna, self.cloning) {
            (false, _) => format!("keys move by wrapping ({wrap})"),
            (true, cloning) => format!(
                "Luna partition in {} mode; clones with {}; {wrap}",
                if self.private_key_cloning {
                    "Cloning"
                } else {
                    "Key Export"
                },
                match cloning {
                    Some(Cloning { migrate: true, .. }) => "CA_MigrateKeys",
                    Some(_) => "CA_CloneObject",
                    None => "nothing",
                }
            ),
        }
    }
}

/// Whether the library now refuses every key-wrap mechanism it was found
/// to carry (`capabilities`): asked without a key, as when it was attached.
pub fn refuses_wrapping(
    library: &dyn MemberBackend,
    slot: CK_SLOT_ID,
    capabilities: &Capabilities,
) -> bool {
    let carried: Vec<CK_MECHANISM_TYPE> = capabilities
        .wrap_mechanisms
        .iter()
        .flatten()
        .copied()
        .collect();
    !carried.is_empty()
        && carried
            .iter()
            .all(|m| refuses_to_wrap_with(library, slot, *m))
}

/// Whether the library refuses a key-wrap mechanism it lists, asked
/// without a key: a wrap with no wrapping key and no key, in a session of
/// its own, is refused for the handles by a library that takes the
/// mechanism and for the mechanism (`CKR_MECHANISM_INVALID`) by one that
/// cannot carry it, as p11-kit 0.24's client, which refuses to send it.
/// A library that cannot open a session is not taken to refuse.
fn refuses_to_wrap_with(
    library: &dyn MemberBackend,
    slot: CK_SLOT_ID,
    mechanism: CK_MECHANISM_TYPE,
) -> bool {
    let mut session: CK_SESSION_HANDLE = CK_INVALID_HANDLE;
    let opened = library.open_session(slot, CKF_SERIAL_SESSION, &mut session);
    if opened != CKR_OK {
        return false;
    }
    let mechanism = BareMechanism::new(mechanism);
    let mut len: CK_ULONG = 0;
    let rv = library.wrap_key(
        session,
        mechanism.as_raw(),
        CK_INVALID_HANDLE,
        CK_INVALID_HANDLE,
        None,
        &mut len,
    );
    let _ = library.close_session(session);
    rv == CKR_MECHANISM_INVALID
}

fn mechanism_name(mechanism: CK_MECHANISM_TYPE) -> String {
    match mechanism {
        CKM_AES_KEY_WRAP_PAD => "CKM_AES_KEY_WRAP_PAD".into(),
        CKM_AES_KWP => "CKM_AES_KWP".into(),
        other => format!("mechanism 0x{other:X}"),
    }
}

/// What start-up probes found: whether two Luna partitions whose policies
/// could not be read clone a private key, per pair of members and their
/// epochs then, either way: cloning a private key needs both partitions
/// to allow it, so the answer one way is the answer the other (keys are
/// made on whichever member of a pair is chosen). A probe
/// clones a throw-away session key pair and destroys it; it runs the
/// first time a private key is to move between such partitions, since it
/// needs the group's login.
#[derive(Default)]
pub struct Probes {
    found: parking_lot::Mutex<Vec<Probed>>,
}

/// (source position, epoch), (target position, epoch), whether it cloned.
type Probed = ((usize, u64), (usize, u64), bool);

impl Probes {
    pub fn get(&self, source: (usize, u64), target: (usize, u64)) -> Option<bool> {
        self.found
            .lock()
            .iter()
            .find(|(s, t, _)| (*s, *t) == (source, target) || (*s, *t) == (target, source))
            .map(|(_, _, clones)| *clones)
    }

    pub fn record(&self, source: (usize, u64), target: (usize, u64), clones: bool) {
        let mut found = self.found.lock();
        let pair = |a: usize, b: usize| (a.min(b), a.max(b));
        found.retain(|(s, t, _)| pair(s.0, t.0) != pair(source.0, target.0));
        found.push((source, target, clones));
    }
}

/// One member as [`choose`] sees it.
pub struct Side<'a> {
    pub serial: &'a str,
    /// Partitions clone only within one loaded library instance.
    pub library: &'a dyn MemberBackend,
    pub capabilities: &'a Capabilities,
}

/// The way a key of `class` moves from `source` to `target`: cloning where
/// both are partitions of one Luna library instance that may clone it,
/// else wrapping where the source may wrap it and both list a key-wrap
/// mechanism. `Err` says, in one line, why neither can.
pub fn choose(
    source: &Side,
    target: &Side,
    class: CK_OBJECT_CLASS,
) -> std::result::Result<Strategy, String> {
    let private = class == CKO_PRIVATE_KEY;
    let (from, to) = (source.capabilities, target.capabilities);
    let same_instance = same_library(source.library, target.library);
    let cloning_refused = if from.cloning.is_none() || to.cloning.is_none() {
        None
    } else if !same_instance {
        Some(format!(
            "members {} and {} are partitions of different Luna library instances, which cannot clone to each other",
            source.serial, target.serial
        ))
    } else if private && !from.private_key_cloning {
        Some(format!(
            "member {}'s partition does not allow private key cloning (Key Export mode)",
            source.serial
        ))
    } else if private && !to.private_key_cloning {
        Some(format!(
            "member {}'s partition does not allow private key cloning (Key Export mode)",
            target.serial
        ))
    } else {
        return Ok(Strategy::Clone);
    };
    let common = from
        .wrap_mechanisms
        .iter()
        .flatten()
        .find(|m| to.wrap_mechanisms.contains(&Some(**m)));
    let wrapping_refused = if private && !from.private_key_wrapping {
        format!(
            "member {}'s partition does not allow private key wrapping (Cloning mode)",
            source.serial
        )
    } else if let Some(mechanism) = common {
        return Ok(Strategy::Wrap(*mechanism));
    } else if let Some(refusing) = [(source, from), (target, to)]
        .iter()
        .find(|(_, can)| can.wrap_refused)
    {
        format!(
            "member {}'s library refuses the key-wrap mechanism it lists",
            refusing.0.serial
        )
    } else {
        format!(
            "members {} and {} list no common key-wrap mechanism (CKM_AES_KEY_WRAP_PAD or Luna's CKM_AES_KWP)",
            source.serial, target.serial
        )
    };
    let kind = if private { "private" } else { "secret" };
    Err(match cloning_refused {
        Some(why) => format!(
            "no way to move {kind} keys from member {} to member {}: {why}, and {wrapping_refused}",
            source.serial, target.serial
        ),
        None => format!(
            "no way to move {kind} keys from member {} to member {}: {wrapping_refused}",
            source.serial, target.serial
        ),
    })
}

/// Why a slot cannot be a member, if it cannot: Luna's own HA virtual slot
/// already spreads work over partitions, and an HA group over it would
/// hide its members' failures from this one and replicate twice.
pub fn refusal(library: &dyn MemberBackend, slot: CK_SLOT_ID) -> Option<String> {
    let info = library.slot_info(slot).ok()?;
    (padded_to_string(&info.slotDescription) == LUNA_HA_SLOT_DESCRIPTION).then(|| {
        format!(
            "slot {slot} of library {} is a Luna HA virtual slot ({LUNA_HA_SLOT_DESCRIPTION:?}); an HA slot cannot be a member of another HA group: configure its member partitions instead",
            library.name()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::member::MemberLibrary;
    use std::sync::Arc;

    fn luna(cloning: bool) -> Capabilities {
        Capabilities {
            cloning: Some(Cloning {
                migrate: false,
                clone: false,
            }),
            luna: true,
            private_key_cloning: cloning,
            private_key_wrapping: !cloning,
            policies_read: true,
            wrap_mechanisms: [None, Some(CKM_AES_KWP)],
            wrap_refused: false,
            unlisted: false,
        }
    }

    fn softhsm() -> Capabilities {
        Capabilities {
            private_key_wrapping: true,
            wrap_mechanisms: [Some(CKM_AES_KEY_WRAP_PAD), None],
            ..Capabilities::default()
        }
    }

    fn pick(
        a: &Capabilities,
        b: &Capabilities,
        same: bool,
        class: CK_OBJECT_CLASS,
    ) -> std::result::Result<Strategy, String> {
        let one = Arc::new(
            MemberLibrary::load(
                "x",
                std::path::Path::new("/usr/lib/softhsm/libsofthsm2.so"),
                &[],
            )
            .expect("SoftHSM loads"),
        );
        let other = if same {
            Arc::clone(&one)
        } else {
            Arc::new(
                MemberLibrary::load(
                    "y",
                    std::path::Path::new("/usr/lib/softhsm/libsofthsm2.so"),
                    &[],
                )
                .expect("SoftHSM loads"),
            )
        };
        choose(
            &Side {
                serial: "A",
                library: one.as_ref(),
                capabilities: a,
            },
            &Side {
                serial: "B",
                library: other.as_ref(),
                capabilities: b,
            },
            class,
        )
    }

    #[test]
    fn cloning_mode_partitions_of_one_instance_clone() {
        let c = luna(true);
        assert_eq!(pick(&c, &c, true, CKO_PRIVATE_KEY), Ok(Strategy::Clone));
        assert_eq!(pick(&c, &c, true, CKO_SECRET_KEY), Ok(Strategy::Clone));
    }

    #[test]
    fn key_export_mode_wraps_private_keys_with_the_vendor_mechanism() {
        let e = luna(false);
        assert_eq!(
            pick(&e, &e, true, CKO_PRIVATE_KEY),
            Ok(Strategy::Wrap(CKM_AES_KWP))
        );
        assert_eq!(pick(&e, &e, true, CKO_SECRET_KEY), Ok(Strategy::Clone));
    }

    #[test]
    fn mixed_modes_cannot_move_private_keys() {
        let why = pick(&luna(true), &luna(false), true, CKO_PRIVATE_KEY).unwrap_err();
        assert!(
            why.contains("member B's partition does not allow private key cloning"),
            "{why}"
        );
        assert!(
            why.contains("member A's partition does not allow private key wrapping"),
            "{why}"
        );
    }

    #[test]
    fn different_instances_do_not_clone() {
        let c = luna(true);
        let why = pick(&c, &c, false, CKO_PRIVATE_KEY).unwrap_err();
        assert!(why.contains("different Luna library instances"), "{why}");
        assert_eq!(
            pick(&c, &c, false, CKO_SECRET_KEY),
            Ok(Strategy::Wrap(CKM_AES_KWP)),
            "secret keys may still be wrapped"
        );
    }

    #[test]
    fn other_members_wrap_with_a_common_mechanism() {
        let s = softhsm();
        assert_eq!(
            pick(&s, &s, false, CKO_PRIVATE_KEY),
            Ok(Strategy::Wrap(CKM_AES_KEY_WRAP_PAD))
        );
        let why = pick(&s, &luna(false), false, CKO_SECRET_KEY).unwrap_err();
        assert!(why.contains("no common key-wrap mechanism"), "{why}");
    }
}
