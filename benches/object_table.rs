//! What forgetting one object costs in a group's object table
//! (`ObjectTable`, src/object.rs) as the table grows: removing an object
//! takes with it any alias a search made for one of its copies, and each
//! destroy and each closed session's session object removes one, under the
//! table's write lock, which every call resolving a handle waits on.
//!
//! Measured at 10,000 and 100,000 objects of a two-member group (each on
//! both members, as replication leaves them): one removal (an object
//! inserted, then removed: the insert is a map insert, the rest is the
//! removal), and one virtual session closed with its one session object.
//!
//! Run: `cargo bench --bench object_table`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use cryptoki_sys::CK_OBJECT_HANDLE;
use pkcs11_ha::object::{ObjectTable, Presence};
use std::hint::black_box;
use std::time::Duration;

const SIZES: [usize; 2] = [10_000, 100_000];

/// A two-member table of `objects` objects, each with a copy on both.
fn table_of(objects: usize) -> ObjectTable {
    let table = ObjectTable::new(2);
    for i in 0..objects {
        let h = i as CK_OBJECT_HANDLE + 1;
        table.insert(vec![Presence::Present(h), Presence::Present(h)], None);
    }
    table
}

fn removal(c: &mut Criterion) {
    let mut group = c.benchmark_group("object_table");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for objects in SIZES {
        let table = table_of(objects);
        let mut next = objects as CK_OBJECT_HANDLE;
        group.bench_with_input(BenchmarkId::new("remove", objects), &objects, |b, _| {
            b.iter(|| {
                next += 1;
                let handle =
                    table.insert(vec![Presence::Present(next), Presence::Present(next)], None);
                black_box(table.remove(handle))
            })
        });
        group.bench_with_input(
            BenchmarkId::new("close_session_with_one_object", objects),
            &objects,
            |b, _| {
                b.iter(|| {
                    next += 1;
                    let session = next;
                    table.insert(
                        vec![Presence::Present(next), Presence::Present(next)],
                        Some(session),
                    );
                    table.remove_owned_by(black_box(session))
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, removal);
criterion_main!(benches);
