// Views' keys and relationships inferred from their base tables (router/rest/view-keys.ts), without a database:
// node trees in the text form pg_rewrite.ev_action has on Postgres 15.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { columnOrigins, inferViewKeys, parseNodeTree, type KeyConstraint, type ViewSource } from '../../router/rest/view-keys.ts';

/** A target entry as Postgres writes it; origin [0, 0] for a computed column. */
const entry = (resno: number, name: string, [table, column]: [number, number]) =>
  `{TARGETENTRY :expr {VAR :varno 1 :varattno ${column} :vartype 23 :vartypmod -1 :varcollid 0 :varlevelsup 0 :varnosyn 1 :varattnosyn ${column} :location 7}`
  + ` :resno ${resno} :resname ${name.replace(/([ (){}\\])/g, '\\$1')} :ressortgroupref 0 :resorigtbl ${table} :resorigcol ${column} :resjunk false}`;

/** A view's rule action: a range table holding a subquery with its own target list, then the view's own target list. */
const definition = (entries: string[]) => `({QUERY :commandType 1 :querySource 0 :canSetTag true :utilityStmt <> :resultRelation 0 :hasAggs false`
  + ` :cteList <> :rtable ({RANGETBLENTRY :alias {ALIAS :aliasname s :colnames <>} :eref {ALIAS :aliasname s :colnames ("a" "b\\ c")} :rtekind 1`
  + ` :subquery {QUERY :commandType 1 :targetList (${entry(1, 'a', [999, 9])}) :limitCount {CONST :consttype 20 :constlen 8 :constbyval true`
  + ` :constisnull false :location 40 :constvalue 8 [ 1 0 0 0 0 0 0 0 ]}} :lateral false}) :jointree {FROMEXPR :fromlist ({RANGETBLREF :rtindex 1}) :quals <>}`
  + ` :targetList (${entries.join(' ')}) :override 0 :onConflict <> :returningList <> :groupClause <> :rowMarks <> :setOperations <>})`;

test('pg_node_tree: nodes, lists, NULL, escaped tokens and datums', () => {
  const tree = parseNodeTree(`({A :x 1 :name my\\ col\\(1\\) :nothing <> :list (i 1 2) :datum 4 [ 1 0 0 0 ] :child {B :y "q"}})`);
  assert.deepEqual(tree, [{ type: 'A', fields: {
    x: '1', name: 'my col(1)', nothing: null, list: ['i', '1', '2'], datum: ['4', '[', '1', '0', '0', '0', ']'], child: { type: 'B', fields: { y: '"q"' } },
  } }]);
});

test('column origins: the view\'s own target list, not a subquery\'s; computed columns have none', () => {
  const text = definition([entry(1, 'id', [100, 1]), entry(2, 'odd name)', [100, 3]), entry(3, 'total', [0, 0])]);
  assert.deepEqual(columnOrigins(text), [{ column: 1, table: 100, tableColumn: 1 }, { column: 2, table: 100, tableColumn: 3 }]);
});

// tables: clients (oid 100: id 1, name 2), projects (200: id 1, client_id 2), private.details (300: id 1) one-to-one to clients,
// users_projects (400: user_id 1, project_id 2) with a composite primary key
const rel = (oid: number, name: string, attnums: number[], columns: string[], schema = 'public') => ({ oid, schema, name, attnums, columns });
const constraints: KeyConstraint[] = [
  { name: 'clients_pkey', type: 'p', table: rel(100, 'clients', [1], ['id']), ref: null, oneToOne: false },
  { name: 'projects_pkey', type: 'p', table: rel(200, 'projects', [1], ['id']), ref: null, oneToOne: false },
  { name: 'projects_client_id_fkey', type: 'f', table: rel(200, 'projects', [2], ['client_id']), ref: rel(100, 'clients', [1], ['id']), oneToOne: false },
  { name: 'details_id_fkey', type: 'f', table: rel(300, 'details', [1], ['id'], 'private'), ref: rel(100, 'clients', [1], ['id']), oneToOne: true },
  { name: 'users_projects_pkey', type: 'p', table: rel(400, 'users_projects', [1, 2], ['user_id', 'project_id']), ref: null, oneToOne: false },
];
const view = (oid: number, name: string, columns: string[], origins: [number, number][]): ViewSource => ({
  oid, schema: 'public', name, columns: Object.fromEntries(columns.map((c, i) => [String(i + 1), c])),
  definition: definition(columns.map((c, i) => entry(i + 1, c, origins[i]))),
});

test('views take their base tables\' primary keys under their own column names, only whole keys', () => {
  const views = [
    view(1000, 'client_list', ['key', 'name'], [[100, 1], [100, 2]]),
    view(1001, 'twice', ['a', 'b'], [[100, 1], [100, 1]]),
    view(1002, 'half_key', ['user_id', 'role'], [[400, 1], [0, 0]]),
    view(1003, 'whole_key', ['p', 'u'], [[400, 2], [400, 1]]),
    view(1004, 'over_view', ['k'], [[1000, 1]]),
  ];
  const { primaryKeys } = inferViewKeys(views, constraints);
  assert.deepEqual(Object.fromEntries(primaryKeys), { 1000: ['key'], 1001: ['a'], 1003: ['u', 'p'], 1004: ['k'] });
});

test('views take foreign keys both ways and between views, through other views and from tables of other schemas', () => {
  const views = [
    view(1000, 'client_list', ['key', 'name'], [[100, 1], [100, 2]]),
    view(1001, 'project_items', ['pid', 'client'], [[200, 1], [200, 2]]),
    view(1002, 'open_items', ['client'], [[1001, 2]]),
    view(1003, 'vat', ['client'], [[300, 1]]),
  ];
  const fks = inferViewKeys(views, constraints).foreignKeys.map((f) => `${f.name}: ${f.table}(${f.columns}) -> ${f.refTable}(${f.refColumns})${f.oneToOne ? ' 1:1' : ''}`);
  assert.deepEqual(fks, [
    'projects_client_id_fkey: project_items(client) -> clients(id)',
    'projects_client_id_fkey: open_items(client) -> clients(id)',
    'projects_client_id_fkey: projects(client_id) -> client_list(key)',
    'projects_client_id_fkey: project_items(client) -> client_list(key)',
    'projects_client_id_fkey: open_items(client) -> client_list(key)',
    'details_id_fkey: vat(client) -> clients(id) 1:1',
    'details_id_fkey: details(id) -> client_list(key) 1:1',
    'details_id_fkey: vat(client) -> client_list(key) 1:1',
  ]);
  // a key column shown twice: a relationship through each
  const twice = inferViewKeys([view(1005, 'dup', ['c1', 'c2'], [[200, 2], [200, 2]])], constraints).foreignKeys;
  assert.deepEqual(twice.map((f) => f.columns), [['c1'], ['c2']]);
});

test('a cycle of views (impossible in Postgres, but a bad tree must not hang) ends', () => {
  const views = [view(1, 'a', ['x'], [[2, 1]]), view(2, 'b', ['y'], [[1, 1]])];
  assert.deepEqual(inferViewKeys(views, constraints).foreignKeys, []);
});
