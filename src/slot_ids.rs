//! Pass-through slot IDs: which ID a member library's slot gets, and back.
//! IDs stay below 2^31 (Java's SunPKCS11 and other tools read a slot ID as
//! an `int`), depend only on the library's name in the config and the
//! member's own slot ID -- so they are the same in every process and on
//! every start -- and never change or get reused while the process runs.

use cryptoki_sys::CK_SLOT_ID;
use parking_lot::RwLock;
use std::collections::HashMap;

/// Pass-through slot IDs start here; virtual slots (`VirtualTokenNN`) are
/// the IDs below.
pub const FIRST_PASSTHROUGH_SLOT: CK_SLOT_ID = 0x1000;
/// One past the last ID: IDs must fit a signed 32-bit integer.
const PASSTHROUGH_LIMIT: CK_SLOT_ID = 1 << 31;

/// The ID a member slot hashes to: FNV-1a (32 bits) of
/// `"<library name, lower case>/<member slot ID in decimal>"`, brought
/// into `[0x1000, 2^31)`. `scripts/lib.sh` computes the same.
pub fn hashed_slot_id(library_name: &str, member_slot: CK_SLOT_ID) -> CK_SLOT_ID {
    let key = format!("{}/{member_slot}", library_name.to_ascii_lowercase());
    let hash = key.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    FIRST_PASSTHROUGH_SLOT + CK_SLOT_ID::from(hash) % (PASSTHROUGH_LIMIT - FIRST_PASSTHROUGH_SLOT)
}

/// The next ID after `id`, wrapping within the pass-through range.
fn next_slot_id(id: CK_SLOT_ID) -> CK_SLOT_ID {
    if id + 1 == PASSTHROUGH_LIMIT {
        FIRST_PASSTHROUGH_SLOT
    } else {
        id + 1
    }
}

/// A member slot: its library's position in `[Libraries]` and its own ID.
pub type MemberSlot = (usize, CK_SLOT_ID);

/// The pass-through IDs handed out so far. A member slot whose hashed ID
/// is taken gets the next free one; member slots are numbered in config
/// order, then in their library's order, so two slots that collide get the
/// same IDs on every start.
#[derive(Default)]
pub struct PassThroughSlots {
    numbering: RwLock<Numbering>,
}

#[derive(Default)]
struct Numbering {
    by_id: HashMap<CK_SLOT_ID, MemberSlot>,
    by_member: HashMap<MemberSlot, CK_SLOT_ID>,
}

impl PassThroughSlots {
    /// The member slot behind `id`, if it has been numbered.
    pub fn member(&self, id: CK_SLOT_ID) -> Option<MemberSlot> {
        self.numbering.read().by_id.get(&id).copied()
    }

    /// Whether every one of `slots` has its ID already.
    pub fn all_numbered(&self, slots: &[(&str, MemberSlot)]) -> bool {
        let numbering = self.numbering.read();
        slots
            .iter()
            .all(|(_, member)| numbering.by_member.contains_key(member))
    }

    /// The IDs of `slots` (each with its library's name), numbering those
    /// seen for the first time, in the order given.
    pub fn ids(&self, slots: Vec<(&str, MemberSlot)>) -> Vec<CK_SLOT_ID> {
        {
            let numbering = self.numbering.read();
            let known: Option<Vec<CK_SLOT_ID>> = slots
                .iter()
                .map(|(_, member)| numbering.by_member.get(member).copied())
                .collect();
            if let Some(known) = known {
                return known;
            }
        }
        let mut numbering = self.numbering.write();
        slots
            .iter()
            .map(|&(name, member)| {
                if let Some(id) = numbering.by_member.get(&member) {
                    return *id;
                }
                let mut id = hashed_slot_id(name, member.1);
                while numbering.by_id.contains_key(&id) {
                    id = next_slot_id(id);
                }
                numbering.by_id.insert(id, member);
                numbering.by_member.insert(member, id);
                id
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_below_2_31_and_stable() {
        // The member slot IDs SoftHSM derives from serials are up to 2^32.
        let id = hashed_slot_id("softhsm", 0x2dbd_55c8);
        assert!((FIRST_PASSTHROUGH_SLOT..PASSTHROUGH_LIMIT).contains(&id));
        assert_eq!(id, hashed_slot_id("SoftHSM", 0x2dbd_55c8));
        assert_ne!(id, hashed_slot_id("softhsm", 0x2dbd_55c9));
        assert_ne!(id, hashed_slot_id("other", 0x2dbd_55c8));
    }

    #[test]
    fn known_value_matches_scripts_lib_sh() {
        // FNV-1a-32("softhsm/1234") = 0x858c2698; `passthrough_slot_id
        // softhsm 1234` in scripts/lib.sh prints the same.
        assert_eq!(hashed_slot_id("softhsm", 1234), 93_079_192);
    }

    #[test]
    fn a_collision_takes_the_next_free_id_in_config_order() {
        // Find two member slots of one library that hash to the same ID.
        let mut seen = HashMap::new();
        let (first, second) = (0..)
            .find_map(|slot| {
                let id = hashed_slot_id("lib", slot);
                seen.insert(id, slot).map(|earlier| (earlier, slot))
            })
            .unwrap();
        let hashed = hashed_slot_id("lib", first);
        for _ in 0..2 {
            let slots = PassThroughSlots::default();
            let ids = slots.ids(vec![("lib", (0, first)), ("lib", (0, second))]);
            assert_eq!(ids, [hashed, next_slot_id(hashed)]);
            assert_eq!(slots.member(ids[1]), Some((0, second)));
            assert_eq!(slots.ids(vec![("lib", (0, second))]), [ids[1]]);
        }
    }
}
