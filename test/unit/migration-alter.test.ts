/** Online migrations (decision 0060): which ALTER TABLE statements are carried, the statement rewritten for the shadow table, and the column mapping. */
import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { AlterError, forTable, loadParser, mappedColumns, parseAlter } from '../../materializer/alter.ts';
import { migrationTables } from '../../materializer/migration.ts';

before(() => loadParser());

test('supported subcommands: the table is found and the statement runs on the shadow with the same subcommands', () => {
  const a = parseAlter('ALTER TABLE orders ADD COLUMN note text DEFAULT \'n/a\' NOT NULL, ALTER COLUMN qty TYPE bigint;');
  assert.deepEqual([a.schema, a.table], ['public', 'orders']);
  assert.equal(forTable(a, 'mg_materializer."_mg_orders_1"'), 'ALTER TABLE mg_materializer."_mg_orders_1" ADD COLUMN note text DEFAULT \'n/a\' NOT NULL, ALTER COLUMN qty TYPE bigint');
  const q = parseAlter('alter table only "Sales" . "Order ""X""" drop column w, add constraint pos check (qty > 0), drop constraint old_check, alter qty set default 1, alter note drop not null');
  assert.deepEqual([q.schema, q.table], ['Sales', 'Order "X"']);
  assert.equal(forTable(q, 'S'), 'alter table only S drop column w, add constraint pos check (qty > 0), drop constraint old_check, alter qty set default 1, alter note drop not null');
  const u = parseAlter('ALTER TABLE ünïcode.tbl ADD x int');
  assert.equal(forTable(u, 'T'), 'ALTER TABLE T ADD x int');
});

test('what a shadow cannot carry is refused, naming it', () => {
  const refused = (sql: string, re: RegExp) => assert.throws(() => parseAlter(sql), (e: Error) => e instanceof AlterError && re.test(e.message), sql);
  refused('ALTER TABLE t ALTER v TYPE int USING v::int', /ALTER COLUMN v TYPE \.\.\. USING/);
  refused('ALTER TABLE t ADD UNIQUE (a)', /ADD CONSTRAINT UNIQUE \(only CHECK constraints\)/);
  refused('ALTER TABLE t ADD COLUMN q int REFERENCES x', /ADD COLUMN q with FOREIGN/);
  refused('ALTER TABLE t ADD COLUMN q int PRIMARY KEY', /ADD COLUMN q with PRIMARY/);
  refused('ALTER TABLE t SET TABLESPACE x, ADD COLUMN y int', /not supported by an online migration: SET TABLE SPACE/);
  refused('ALTER TABLE t RENAME COLUMN a TO b', /only ALTER TABLE is migrated online \(got RenameStmt\)/);
  refused('CREATE INDEX i ON t (a)', /got IndexStmt/);
  refused('ALTER INDEX i SET (fillfactor = 50)', /got ALTER INDEX/);
  refused('ALTER TABLE a ADD x int; ALTER TABLE b ADD y int', /one ALTER TABLE statement \(got 2/);
  refused('ALTER TABLE IF EXISTS t ADD x int', /IF EXISTS/);
  refused('ALTER TABLE mg_materializer.positions ADD x int', /internal to the project/);
  refused('ALTER TABLE t ADD', /syntax error/);
});

test('column mapping: added columns default, dropped ones are left out, changed types take the new type; the reverse mapping mirrors it', () => {
  const old = [{ name: 'id', type: 'integer', notNull: true }, { name: 'qty', type: 'integer', notNull: false }, { name: 'gone', type: 'text', notNull: false }];
  const next = [{ name: 'id', type: 'integer', notNull: true }, { name: 'qty', type: 'bigint', notNull: false }, { name: 'note', type: 'text', notNull: true }];
  assert.deepEqual(mappedColumns(old, next).map((c) => `${c.name} ${c.type}`), ['id integer', 'qty bigint']);
  assert.deepEqual(mappedColumns(next, old).map((c) => `${c.name} ${c.type}`), ['id integer', 'qty integer']);
});

test('the shadow and old tables are named after the table and the migration, within Postgres\'s 63 characters', () => {
  assert.deepEqual(migrationTables('orders', 'mig_0123456789ab'), { shadow: '_mg_orders_0123456789ab', old: '_mg_orders_0123456789ab_old' });
  const long = migrationTables('x'.repeat(63), 'mig_0123456789ab');
  assert.ok(long.old.length <= 63, long.old);
});
