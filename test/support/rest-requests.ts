/**
 * Requests over the REST fixture schema (test/fixtures/rest-schema.sql), generated
 * from its tables, columns, relationships and functions: filters of every
 * operator, select shapes, embeddings, order, ranges, Prefer headers, writes,
 * RPC, JWTs and errors. The differential test sends each to PostgREST 12.0.2 and
 * to router/rest and compares the answers.
 */
import { createHmac } from 'node:crypto';
import { jwtSecret } from './postgrest.ts';

export interface TestRequest {
  method: 'GET' | 'HEAD' | 'POST' | 'PATCH' | 'PUT' | 'DELETE';
  path: string;
  headers?: Record<string, string>;
  body?: string;
}

export function signJwt(claims: Record<string, unknown>, secret = jwtSecret): string {
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const data = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${data}.${createHmac('sha256', secret).update(data).digest('base64url')}`;
}

export const userToken = (sub = 'ann') => `Bearer ${signJwt({ role: 'app_user', sub })}`;

const CSV = { Accept: 'text/csv' };
const BLOCKED = { 'X-Blocked': 'yes' };
const STRIPPED = { Accept: 'application/vnd.pgrst.array+json;nulls=stripped' };
const SINGLE = { Prefer: 'params=single-object' };
const TSV = { Accept: 'text/tab-separated-values' };
const OBJECT = { Accept: 'application/vnd.pgrst.object+json' };
const get = (path: string, headers?: Record<string, string>): TestRequest => ({ method: 'GET', path, headers });

/** Column values worth filtering on, per table. */
const SAMPLES: Record<string, Record<string, string[]>> = {
  clients: { id: ['1', '2', '9'], name: ['Acme', 'Initech'], city: ['Berlin', 'Austin'] },
  projects: { id: ['1', '3'], name: ['Rocket', 'Orphan'], client_id: ['1', '3'], budget: ['20', '1000.50'], started: ['2024-01-05', '2024-01-01'] },
  tasks: { id: ['2', '4'], project_id: ['1', '2'], title: ['build', 'forge'], priority: ['1', '2'] },
  users: { id: ['1', '2'], name: ['ann', 'bob'], email: ['ann@example.com'] },
};

export function readRequests(): TestRequest[] {
  const out: TestRequest[] = [];
  const ops = ['eq', 'neq', 'gt', 'gte', 'lt', 'lte'];
  for (const [table, cols] of Object.entries(SAMPLES)) {
    out.push(get(`/${table}`), get(`/${table}?select=*`), get(`/${table}?limit=1`), get(`/${table}?offset=1`), get(`/${table}?limit=0`));
    for (const [col, values] of Object.entries(cols)) {
      for (const v of values) for (const op of ops) out.push(get(`/${table}?${col}=${op}.${encodeURIComponent(v)}`));
      out.push(get(`/${table}?${col}=is.null`), get(`/${table}?${col}=not.is.null`), get(`/${table}?${col}=in.(${values.map(encodeURIComponent).join(',')})`));
      out.push(get(`/${table}?${col}=not.in.(${encodeURIComponent(values[0])})`), get(`/${table}?order=${col}.desc.nullsfirst`), get(`/${table}?order=${col}.asc.nullslast&select=${col}`));
      out.push(get(`/${table}?select=${col}&order=${col}`), get(`/${table}?select=x:${col}`), get(`/${table}?select=${col}::text`));
    }
  }
  out.push(
    get('/clients?name=like.A*'), get('/clients?name=ilike.*c*'), get('/clients?name=not.like.*e*'), get('/clients?name=match.^A'),
    get('/clients?name=imatch.^a'), get('/clients?city=isdistinct.Berlin'), get('/clients?city=is.unknown'),
    get('/projects?tags=cs.%7Bspace%7D'), get('/projects?tags=cd.%7Bspace,fast,slow%7D'), get('/projects?tags=ov.%7Bheavy,x%7D'),
    get('/projects?active=is.true'), get('/projects?active=is.false&select=id'), get('/projects?active=not.is.true'),
    get('/projects?select=id,meta->lead->>name'), get('/projects?select=id,lead:meta->lead'), get('/projects?select=id,meta->size'),
    get('/projects?meta->>size=eq.3'), get('/projects?meta->size=gt.2&select=id'), get('/projects?meta->lead->>name=eq.Bob&select=name'),
    get('/projects?select=id,budget::text,started::text'), get('/projects?select=id,tags'),
    get('/projects?or=(id.eq.1,budget.is.null)'), get('/projects?and=(id.gt.1,id.lt.4)&select=id'),
    get('/projects?or=(and(id.gt.1,id.lt.4),name.eq.Orphan)&order=id.desc'), get('/projects?not.or=(id.eq.1,id.eq.2)&select=id'),
    get('/projects?not.and=(active.is.true,budget.gt.10)&select=id'), get('/projects?or=(name.in.(Rocket,Anvil),id.eq.4)&select=id'),
    get('/projects?started=gte.2024-01-01&started=lt.2024-02-01&select=id,started'),
    get('/project_summary'), get('/project_summary?budget=gt.10&order=id'), get('/project_summary?client=is.null'),
    // embedding: many-to-one, one-to-many, many-to-many, nested, inner, filters/order/limit inside
    get('/projects?select=name,clients(name)'), get('/projects?select=name,client:clients(name,city)'), get('/projects?select=id,clients(*)&order=id'),
    get('/clients?select=name,projects(name)'), get('/clients?select=name,projects(name,tasks(title,done))'),
    get('/clients?select=*,projects(*)&order=id.desc'), get('/projects?select=id,users(name)'), get('/users?select=name,projects(name)'),
    get('/projects?select=id,users(name),tasks(title),clients(name)'), get('/tasks?select=title,projects(name,clients(name))'),
    get('/clients?select=name,projects!inner(id)&projects.id=eq.3'), get('/clients?select=name,projects(id)&projects.id=eq.3'),
    get('/projects?select=id,clients!inner(name)&clients.city=eq.Berlin'), get('/projects?select=id,clients(name)&clients.city=eq.Berlin'),
    get('/clients?select=name,projects(id)&projects.order=id.desc&projects.limit=1'), get('/clients?select=name,projects(id,name)&projects.or=(id.eq.1,id.eq.3)'),
    get('/clients?select=name,projects(name,tasks(title))&projects.tasks.done=is.true'), get('/projects?select=*,tasks(count)'),
    get('/projects?select=id,clients!projects_client_id_fkey(name)'), get('/projects?select=id,client_id(name)'),
    get('/users_projects?select=role,users(name),projects(name)'),
    // ranges and counts
    get('/projects?select=id', { Range: '1-2' }), get('/projects?select=id', { Range: '0-0' }), get('/projects?select=id', { Range: '2-' }),
    get('/projects?select=id', { Range: '10-20', Prefer: 'count=exact' }), get('/projects?select=id&offset=10'),
    get('/projects?select=id&limit=2', { Prefer: 'count=exact' }), get('/projects', { Prefer: 'count=exact' }),
    get('/projects?select=id&limit=2&offset=2', { Prefer: 'count=exact' }), get('/tasks?done=is.true', { Prefer: 'count=exact' }),
    get('/projects?id=gt.100', { Prefer: 'count=exact' }),
    // singular
    get('/clients?id=eq.1', { Accept: 'application/vnd.pgrst.object+json' }), get('/clients?id=eq.99', { Accept: 'application/vnd.pgrst.object+json' }),
    get('/clients?select=name,projects(name)&id=eq.1', { Accept: 'application/vnd.pgrst.object+json' }),
    { method: 'HEAD', path: '/clients' }, { method: 'HEAD', path: '/projects?id=eq.1' },
    // profiles
    get('/clients', { 'Accept-Profile': 'public' }), get('/clients', { 'Accept-Profile': 'other' }),
    // RPC
    get('/rpc/add?a=1&b=2'), get('/rpc/add?a=x&b=2'), get('/rpc/add?a=1'), get('/rpc/echo?note=hi'),
    get('/rpc/projects_of?cid=1'), get('/rpc/projects_of?cid=1&select=id,name&id=gt.1'), get('/rpc/projects_of?cid=1&order=id.desc&limit=1'),
    get('/rpc/projects_of?cid=1&select=id,tasks(title)'), get('/rpc/projects_of?cid=3&select=name,clients(name)'), get('/rpc/whoami'), get('/rpc/noop'), get('/rpc/touch_client?cid=1'),
    get('/rpc/whoami', { Authorization: userToken() }), get('/rpc/whoami', { Authorization: userToken('bob') }),
    // JWT and RLS
    get('/notes', { Authorization: userToken() }), get('/notes', { Authorization: userToken('bob') }), get('/notes'),
    get('/clients', { Authorization: 'Bearer abc.def.ghi' }), get('/clients', { Authorization: `${userToken()}x` }),
    // request errors
    get('/nope'), get('/clients?foo=eq.1'), get('/clients?id=eq.abc'), get('/clients?id=xx.1'), get('/clients?select=name,foo(name)'),
    get('/clients?id=is.maybe'), get('/clients?order=id.sideways'), get('/clients?limit=abc'), get('/projects?select=id,budget::nosuchtype'),
    get('/clients?select=id&projects.id=eq.1'), get('/clients?id=in.1,2'), get('/clients?select=id', { Range: '3-1' }),
    // CSV out (quoting as Postgres's record text), and Accept negotiation
    get('/clients', CSV), get('/clients?id=gt.100', CSV), get('/clients?id=gt.100', { ...CSV, Prefer: 'count=exact' }),
    get('/projects?select=id,name,tags,meta,budget,started,clients(name)&order=id', CSV), get('/projects?select=n:name,t:tags&id=eq.4', CSV),
    get('/project_summary?order=id', CSV), get('/projects?select=id', { ...CSV, Range: '1-2', Prefer: 'count=exact' }),
    get('/rpc/projects_of?cid=1&select=id,name', CSV), get('/rpc/add?a=1&b=2', CSV), get('/rpc/echo?note=a,b', CSV), get('/rpc/nums?n=3', CSV),
    get('/rpc/nums?n=0', CSV), get('/rpc/odd_names', CSV), get('/rpc/odd_names'), get('/rpc/whoami', CSV), get('/rpc/noop', CSV), get('/notes', { ...CSV, Authorization: userToken() }), { method: 'HEAD', path: '/clients', headers: CSV },
    get('/clients', { Accept: 'text/html' }), get('/clients', { Accept: 'text/csv, application/json' }), get('/clients', { Accept: 'application/json;q=0.5, text/csv' }),
    get('/clients', { Accept: '*/*' }), get('/clients', { Accept: 'text/*' }), get('/clients?id=eq.1', { Accept: 'application/vnd.pgrst.object+json, text/csv' }),
    // spread embeds: many-to-one (renamed, *, nested, !inner with a filter), and to-many refused (PGRST119)
    get('/projects?select=id,...clients(name)&order=id'), get('/projects?select=id,...clients(cname:name,city)&id=lt.3'), get('/projects?select=id,...clients(*)&id=eq.1'),
    get('/clients?select=id,...projects(name)'), get('/tasks?select=title,...projects(pname:name,...clients(cname:name))&order=id'),
    get('/projects?select=id,...clients!inner(name)&clients.city=eq.Berlin'), get('/projects?select=...clients(name)&id=eq.1'),
    get('/projects?select=id,...clients(name,projects(id))&id=eq.1'), get('/users_projects?select=role,...users(name),...projects(pname:name)&order=user_id,project_id'),
    get('/projects?select=id,...clients(name)&order=id', CSV), get('/rpc/projects_of?cid=1&select=id,...clients(name)'),
    // the OpenAPI document's headers and refusals (its body is compared in its own test)
    { method: 'HEAD', path: '/' }, get('/', { Accept: 'text/csv' }), get('/', { 'Accept-Profile': 'other' }),
    // response.headers / response.status set by functions
    get('/rpc/with_headers'), get('/rpc/with_headers?select=id', CSV), get('/rpc/bad_headers'), get('/rpc/bad_status'), get('/rpc/teapot'),
    // nulls=stripped: null-valued keys dropped at every depth (PostgREST's own array/object types only, the parameter before q)
    ...[
      '/clients?order=id', '/clients?id=eq.2', '/projects?select=id,meta,clients(name,city)&order=id', '/clients?select=id,projects(id,budget,meta)',
      '/projects?select=id,...clients(city)&order=id', '/rpc/whoami', '/rpc/odd_names', '/rpc/add?a=1&b=2', '/rpc/projects_of?cid=3', '/rpc/noop', '/project_summary',
    ].flatMap((path) => [get(path, STRIPPED), get(path, { Accept: 'application/vnd.pgrst.object+json;nulls=stripped' })]),
    get('/clients?id=eq.2', { Accept: 'application/vnd.pgrst.array+json' }), get('/clients?id=eq.2', { Accept: 'application/vnd.pgrst.array' }),
    get('/clients?id=eq.2', { Accept: 'application/json;nulls=stripped' }), get('/clients?id=eq.2', { Accept: 'application/vnd.pgrst.array+json;nulls=STRIPPED' }),
    get('/clients?id=eq.2', { Accept: 'application/vnd.pgrst.object;nulls=stripped' }), get('/clients?id=eq.2', { Accept: 'application/vnd.pgrst.object+json;nulls=other' }),
    get('/clients?id=eq.2', { Accept: 'application/vnd.pgrst.array+json;q=0.5;nulls=stripped' }), get('/clients?id=eq.2', { Accept: 'application/vnd.pgrst.array+json; nulls=stripped;q=1' }),
    get('/clients?id=eq.2', { Accept: 'application/vnd.pgrst.array+json;nulls=stripped;q=0.5, text/csv' }),
    get('/clients?order=id', { ...STRIPPED, Prefer: 'count=exact', Range: '1-1' }), get('/notes', { ...STRIPPED, Authorization: userToken() }),
    // media type handlers: functions returning a domain named after a media type; other results are 415 for those types
    get('/rpc/greet?name=bob', { Accept: 'text/plain' }), get('/rpc/greet?name=bob'), get('/rpc/greet?name=bob', { Accept: '*/*' }),
    get('/rpc/greet?name=bob', { Accept: 'text/*' }), get('/rpc/greet?name=bob', { Accept: 'application/json;q=0.5, text/plain' }),
    get('/rpc/greet?name=bob', { Accept: 'text/plain;q=0.5, application/json' }), get('/rpc/greet?name=bob', CSV),
    get('/rpc/greet?name=bob', { Accept: 'application/vnd.pgrst.object+json' }), get('/rpc/greet?name=bob', { Accept: 'text/html' }),
    get('/rpc/no_text', { Accept: 'text/plain' }), get('/rpc/page?title=Hi', { Accept: 'text/html' }), get('/rpc/page?title=Hi', { Accept: 'text/plain' }),
    get('/rpc/bytes_of?t=abc', { Accept: 'application/octet-stream' }), get('/rpc/bytes_of?t=abc'), get('/rpc/bytes_of?t=abc', { Accept: 'text/plain' }),
    get('/rpc/vendor_json', { Accept: 'application/vnd.fixture+json' }), get('/rpc/greetings', { Accept: 'text/plain' }), get('/rpc/greetings'),
    get('/rpc/echo?note=hi', { Accept: 'text/plain' }), get('/rpc/add?a=1&b=2', { Accept: 'application/octet-stream' }),
    get('/clients?select=name&id=eq.1', { Accept: 'text/plain' }), get('/clients?select=name&id=eq.1', { Accept: 'application/octet-stream' }),
    { method: 'HEAD', path: '/rpc/greet?name=bob', headers: { Accept: 'text/plain' } }, get('/rpc/greet?name=bob', { ...BLOCKED, Accept: 'text/plain' }),
    // a table's handler aggregate (its rows, also what an RPC returns of them; select= changing the row is Postgres's 42846), and "*/*"
    get('/clients?order=id', TSV), get('/clients?id=gt.100', TSV), get('/projects', TSV), get('/clients?select=id,name', TSV), get('/rpc/with_headers', TSV),
    get('/rpc/projects_of?cid=1', TSV), get('/clients?id=eq.1', { ...TSV, Prefer: 'count=exact' }), get('/clients?order=id', { ...TSV, Range: '1-1', Prefer: 'count=exact' }),
    get('/clients?order=id', { Accept: 'application/json;q=0.5, text/tab-separated-values' }), { method: 'HEAD', path: '/clients', headers: TSV },
    get('/rpc/any_bytes', { Accept: 'image/png' }), get('/rpc/any_bytes'), get('/rpc/any_bytes', CSV),
    // count=exact on RPC results (scalar, set, CSV, handler); Accept is case-sensitive
    get('/rpc/add?a=1&b=2', { Prefer: 'count=exact' }), get('/rpc/projects_of?cid=1', { Prefer: 'count=exact' }), get('/rpc/nums?n=3', { Prefer: 'count=exact' }),
    get('/rpc/nums?n=3', { ...CSV, Prefer: 'count=exact' }), get('/rpc/noop', { Prefer: 'count=exact' }), get('/rpc/greet?name=x', { Accept: 'text/plain', Prefer: 'count=exact' }),
    get('/clients?id=eq.1', { Accept: 'TEXT/CSV' }), get('/clients?id=eq.1', { Accept: 'Application/Json' }), get('/rpc/greet?name=a', { Accept: 'TEXT/PLAIN' }),
    // Prefer: params=single-object on GET: the query string's arguments as one JSON object of strings
    get('/rpc/obj_args?j=1', SINGLE), get('/rpc/obj_args', SINGLE), get('/rpc/obj_args?a=1&a=2&b=x', SINGLE), get('/rpc/obj_product?x=2&y=5', SINGLE),
    get('/rpc/add?a=1&b=2', SINGLE),
    // computed relationships: to one (ROWS 1, or not SETOF: a row of NULLs), to many, nested, !inner, spread, count, filters and limits inside
    get('/projects?select=id,owner(name)&order=id'), get('/projects?select=id,lead_client(name,city)&order=id'), get('/projects?select=id,o:owner(*)&order=id'),
    get('/projects?select=id,open_tasks(title)&order=id'), get('/clients?select=id,big_projects(id,name,open_tasks(title))&order=id'),
    get('/projects?select=id,owner!inner(name)&owner.city=eq.Berlin'), get('/projects?select=id,...owner(name)&order=id'), get('/projects?select=id,...open_tasks(title)'),
    get('/projects?select=id,open_tasks(count)&order=id'), get('/projects?select=id,open_tasks(title)&open_tasks.order=title.desc&open_tasks.limit=1&order=id'),
    get('/projects?select=id,owner!nonsense(name)&id=eq.1'), get('/clients?select=id,owner(name)'), get('/tasks?select=id,projects(name,owner(name))&order=id'),
    get('/projects?select=id,open_tasks!inner(title)&open_tasks.title=eq.build'), get('/rpc/projects_of?cid=1&select=id,owner(name),open_tasks(title)'),
    get('/projects?select=id,owner(name),clients(city)&id=eq.2', STRIPPED), get('/projects?select=id,owner(name)&order=id', CSV),
    // views: keys and relationships inferred from their base tables, embedded both ways (to one, to many, many-to-many,
    // one-to-one), through renamed columns, a join and a view over a view; hints; singular responses
    get('/client_list'), get('/client_list?id=gt.1&order=name.desc'), get('/task_items?done=is.false&order=task_id.desc'),
    get('/project_clients?order=id'), get('/open_task_items?order=task_id'), get('/client_vat?order=client'),
    get('/client_list?id=eq.1', OBJECT), get('/task_items?task_id=eq.2', OBJECT), get('/project_clients?id=eq.1', OBJECT),
    get('/project_clients?id=gt.1', OBJECT), get('/open_task_items?task_id=eq.3', OBJECT), get('/project_summary?id=eq.4', OBJECT),
    get('/task_items?select=label,projects(name)&order=task_id'), get('/projects?select=name,task_items(label)&order=id'),
    get('/task_items?select=label,project(name)&order=task_id'), get('/task_items?select=label,projects!project(name)&order=task_id'),
    get('/task_items?select=label,project_clients(name,client_name)&order=task_id'), get('/project_clients?select=name,task_items(label,done)&order=id'),
    get('/project_clients?select=name,clients(city)&order=id'), get('/clients?select=name,project_clients(name)&order=id'),
    get('/client_list?select=name,projects(name)&order=id'), get('/projects?select=name,client_list(name)&order=id'),
    get('/client_list?select=name,project_clients(name,task_items(label))&order=id'), get('/project_clients?select=name,client_list(name)&order=id'),
    get('/open_task_items?select=label,projects(name)&order=task_id'), get('/projects?select=id,open_task_items(label)&order=id'),
    get('/open_task_items?select=label,project_clients(client_name)&order=task_id'), get('/project_clients?select=id,open_task_items(label)&order=id'),
    get('/clients?select=name,client_vat(vat)&order=id'), get('/client_vat?select=vat,clients(name)&order=client'),
    get('/client_vat?select=vat,client_list(name)&order=client'), get('/client_list?select=name,client_vat(vat)&order=id'),
    get('/users?select=name,project_clients(name)&order=id'), get('/project_clients?select=name,users(name)&order=id'),
    get('/client_list?select=name,projects!inner(id)&projects.id=eq.3'), get('/project_clients?select=name,task_items!inner(label)&task_items.done=is.true'),
    get('/projects?select=id,client_list!projects_client_id_fkey(name)&order=id'), get('/projects?select=id,client_list!client_id(name)&order=id'),
    get('/projects?select=id,client_list(name)&client_list.name=eq.Acme&order=id'), get('/client_list?select=id,projects(id)&projects.order=id.desc&projects.limit=1'),
    get('/projects?select=id,client_id(name)&order=id'), get('/task_items?select=label,project_summary(client)&order=task_id'),
    get('/project_summary?select=name,tasks(title)&order=id'), get('/project_summary?select=name,task_items(label)&order=id'),
    get('/project_clients?select=id,...clients(city)&order=id'), get('/task_items?select=label,projects(name,client_list(name))&order=task_id'),
    get('/client_list?select=*,project_clients(count)&order=id'), get('/client_list?select=id,nope(*)'),
    get('/task_pairs?select=id,projects(name)&id=eq.1'), get('/task_pairs?select=id,projects!same_project(name)&id=eq.1'), get('/projects?select=id,task_pairs(id)&id=eq.2'),
    get('/projects?select=id,task_pairs!same_project(id)&id=eq.2'),
    get('/task_items?task_id=eq.1&select=label,projects(name)', OBJECT), get('/client_list?select=name', { Prefer: 'count=exact', Range: '0-1' }),
    // db-pre-request (check_request) refuses with its own status (PT403)
    get('/clients', BLOCKED), get('/rpc/add?a=1&b=2', BLOCKED), get('/', BLOCKED), get('/notes', { ...BLOCKED, Authorization: userToken() }),
  );
  return out;
}

export function writeRequests(): TestRequest[] {
  const J = { 'Content-Type': 'application/json', Authorization: userToken() };
  const w = (method: TestRequest['method'], path: string, body: unknown, headers: Record<string, string> = {}): TestRequest =>
    ({ method, path, headers: { ...J, ...headers }, body: typeof body === 'string' ? body : JSON.stringify(body) });
  const out: TestRequest[] = [];
  for (const ret of [undefined, 'return=minimal', 'return=representation', 'return=headers-only']) {
    const prefer: Record<string, string> = ret ? { Prefer: ret } : {};
    out.push(
      w('POST', '/clients', { id: 9, name: 'Nine' }, prefer),
      w('POST', '/clients', [{ id: 10, name: 'Ten', city: null }, { id: 11, name: 'Eleven', city: 'X' }], prefer),
      w('POST', '/tasks?select=id,title,projects(name)', { project_id: 1, title: 'x' }, prefer),
      w('PATCH', '/clients?id=gte.2', { city: 'Y' }, prefer),
      w('PATCH', '/tasks?done=is.true&select=id,done', { done: false }, prefer),
      w('DELETE', '/tasks?id=eq.5', undefined, prefer),
      w('DELETE', '/tasks?done=is.true', undefined, prefer),
    );
  }
  out.push(
    w('POST', '/clients', { id: 9, name: 'Nine' }, { Prefer: 'return=representation,count=exact' }),
    w('POST', '/clients', { id: 1, name: 'Dup' }),
    w('POST', '/clients', { id: 1, name: 'Merged' }, { Prefer: 'resolution=merge-duplicates,return=representation' }),
    w('POST', '/clients', { id: 1, name: 'Ignored' }, { Prefer: 'return=representation,resolution=ignore-duplicates' }),
    w('POST', '/clients', [{ id: 1, name: 'M' }, { id: 20, name: 'N' }], { Prefer: 'resolution=merge-duplicates' }),
    w('POST', '/users?on_conflict=name', { name: 'ann', id: 7, email: 'new' }, { Prefer: 'resolution=merge-duplicates,return=representation' }),
    w('POST', '/users_projects?on_conflict=user_id,project_id', { user_id: 1, project_id: 1, role: 'x' }, { Prefer: 'resolution=merge-duplicates' }),
    w('POST', '/clients', { id: 'x', name: 'bad' }), w('POST', '/clients', { id: 13, nme: 'bad' }), w('POST', '/clients', '{"id":13'),
    w('POST', '/clients', [{ id: 10, name: 'Ten' }, { id: 11, city: 'X' }]), w('POST', '/clients', {}), w('POST', '/clients', []),
    w('POST', '/tasks', { project_id: 99, title: 'x' }), w('POST', '/clients', { id: 30, name: null }),
    w('POST', '/clients', [{ id: 10, name: 'Ten' }, { id: 11, name: 'Eleven' }], { Accept: 'application/vnd.pgrst.object+json', Prefer: 'return=representation' }),
    w('POST', '/clients', { id: 10, name: 'Ten' }, { Accept: 'application/vnd.pgrst.object+json', Prefer: 'return=representation' }),
    w('POST', '/notes', { body: 'new' }, { Prefer: 'return=representation' }),
    w('PATCH', '/notes', { body: 'mine' }, { Prefer: 'return=representation' }),
    w('PATCH', '/clients?id=eq.1', {}), w('PATCH', '/clients?id=gte.20', { city: 'Y' }), w('PATCH', '/clients?id=eq.1', { nope: 1 }),
    w('PATCH', '/clients?id=eq.1', { city: 'Z' }, { Prefer: 'return=representation', Accept: 'application/vnd.pgrst.object+json' }),
    w('DELETE', '/tasks?done=is.true', undefined, { Prefer: 'return=representation,count=exact' }),
    w('DELETE', '/tasks?done=is.true', undefined, { Prefer: 'count=exact' }), w('DELETE', '/clients?id=eq.1', undefined),
    w('PUT', '/clients?id=eq.1', { id: 1, name: 'Put', city: null }), w('PUT', '/clients?id=gt.1', { id: 1, name: 'x', city: null }),
    w('PUT', '/clients?id=eq.1', { id: 2, name: 'x', city: null }),
    w('POST', '/rpc/add', { a: 1, b: 2 }), w('POST', '/rpc/add', { a: 1 }), w('POST', '/rpc/add', { a: 'x', b: 1 }),
    w('POST', '/rpc/echo', { note: 'hi' }), w('POST', '/rpc/fail', { msg: 'boom' }), w('POST', '/rpc/noop', {}),
    w('POST', '/rpc/projects_of?select=id', { cid: 1 }), w('POST', '/rpc/whoami', {}), w('POST', '/rpc/touch_client', { cid: 1 }),
    { method: 'POST', path: '/clients', headers: { 'Content-Type': 'application/json' }, body: '{"id":9,"name":"anon"}' },
    // INSERT granted without SELECT: the write goes through unless the response would show the row.
    ...[undefined, 'return=minimal', 'return=representation', 'return=headers-only'].map((ret): TestRequest =>
      ({ method: 'POST', path: '/signups', headers: { 'Content-Type': 'application/json', ...(ret ? { Prefer: ret } : {}) }, body: '{"email":"a@example.com"}' })),
    // CSV in: a header of columns, NULL for null, quoted fields, CRLF; and CSV back
    w('POST', '/clients', 'id,name,city\n60,"A, ""x""",NULL\n61,,Paris', { 'Content-Type': 'text/csv', Prefer: 'return=representation' }),
    w('POST', '/clients', 'id,name\r\n62,x\r\n63,y\r\n', { 'Content-Type': 'text/csv', Prefer: 'return=representation', Accept: 'text/csv' }),
    w('POST', '/clients', 'id,name\n64', { 'Content-Type': 'text/csv' }), w('POST', '/clients', 'id,nme\n65,a', { 'Content-Type': 'text/csv' }),
    w('POST', '/clients', '', { 'Content-Type': 'text/csv' }), w('POST', '/clients', 'id,name\n1,dup', { 'Content-Type': 'text/csv' }),
    w('POST', '/tasks', 'project_id,title,priority\n1,x,NULL\n2,"multi\nline",3', { 'Content-Type': 'text/csv', Prefer: 'return=representation' }),
    w('PATCH', '/clients?id=eq.2', 'city\nRome', { 'Content-Type': 'text/csv', Prefer: 'return=representation', Accept: 'text/csv' }),
    w('DELETE', '/tasks?done=is.true', undefined, { Prefer: 'return=representation', Accept: 'text/csv' }),
    // Prefer: missing=default (each row's missing keys take the column defaults: serial, boolean, none)
    w('POST', '/tasks?columns=id,project_id,title,done', [{ project_id: 1, title: 'a' }, { project_id: 1, title: 'b', done: true }], { Prefer: 'missing=default, return=representation' }),
    w('POST', '/tasks?columns=id,project_id,title,done', [{ project_id: 1, title: 'a' }, { project_id: 1, title: 'b', done: null }], { Prefer: 'missing=default' }),
    w('POST', '/tasks?columns=id,project_id,title,done', [{ project_id: 1, title: 'a', id: 90 }], { Prefer: 'missing=null' }),
    w('POST', '/projects?columns=id,name,active,client_id', { id: 77, name: 'x' }, { Prefer: 'return=representation,missing=default' }),
    w('POST', '/clients?columns=id,name,city', [{ id: 1, name: 'M' }, { id: 20, name: 'N' }], { Prefer: 'missing=default,resolution=merge-duplicates,return=representation' }),
    w('POST', '/tasks', 'project_id,title\n1,csv', { 'Content-Type': 'text/csv', Prefer: 'missing=default,return=representation' }),
    w('PATCH', '/projects?id=eq.1&columns=active,name', { name: 'z' }, { Prefer: 'missing=default,return=representation' }),
    w('PATCH', '/projects?id=eq.1&columns=active,name', { name: 'z' }, { Prefer: 'missing=null,return=representation' }),
    // RPC with a single unnamed parameter: the body as sent, by Content-Type
    w('POST', '/rpc/echo_json', '{"a": [1, 2],  "b":null}'), w('POST', '/rpc/echo_jsonb', '{"b":1,"a":2}'), w('POST', '/rpc/echo_json', ''),
    w('POST', '/rpc/shout', 'hello, world', { 'Content-Type': 'text/plain' }), w('POST', '/rpc/shout', '', { 'Content-Type': 'text/plain; charset=utf-8' }),
    w('POST', '/rpc/shout', '{"x":1}'), w('POST', '/rpc/echo_json', 'x', { 'Content-Type': 'text/plain' }),
    w('POST', '/rpc/byte_count', 'abc\u0001\u0002', { 'Content-Type': 'application/octet-stream' }), w('POST', '/rpc/xml_text', '<a>1</a>', { 'Content-Type': 'text/xml' }),
    w('POST', '/clients', { id: 9, name: 'Nine' }, { ...BLOCKED, Prefer: 'return=representation' }), w('DELETE', '/tasks', undefined, BLOCKED),
    w('POST', '/rpc/touch_client', { cid: 1 }, BLOCKED),
    // limited PATCH/DELETE: the first rows of an order (PGRST109 without one)
    w('PATCH', '/clients?limit=1&order=id.desc', { city: 'Z' }, { Prefer: 'return=representation' }), w('PATCH', '/clients?limit=2', { city: 'Z' }),
    w('PATCH', '/tasks?limit=2&offset=1&order=priority.desc.nullslast,id&select=id,done', { done: true }, { Prefer: 'return=representation,count=exact' }),
    w('DELETE', '/tasks?limit=2&order=id&done=is.false', undefined, { Prefer: 'return=representation' }), w('DELETE', '/tasks?limit=1&offset=1&order=id', undefined),
    w('DELETE', '/tasks?limit=0&order=id', undefined, { Prefer: 'return=representation' }),
    // Prefer: params=single-object on POST: the body is the one json/jsonb argument (as sent, or [] for a JSON scalar; CSV as objects)
    ...[
      '{"x": 2,  "y" : [1, null]}', '[{"x":1},{"x":2}]', '[]', '5', '"s"', '[1,2]', '[{"x":1},{"y":2}]', '{"x":', '',
    ].map((body) => w('POST', '/rpc/obj_args', body, SINGLE)),
    w('POST', '/rpc/obj_product', { x: 2, y: 3 }, SINGLE), w('POST', '/rpc/echo_jsonb', { b: 1, a: null }, SINGLE), w('POST', '/rpc/add', { a: 1, b: 2 }, SINGLE),
    w('POST', '/rpc/obj_args', 'abc', { ...SINGLE, 'Content-Type': 'text/plain' }), w('POST', '/rpc/obj_args', 'x,y\n1,2\n3,NULL', { ...SINGLE, 'Content-Type': 'text/csv' }),
    w('POST', '/rpc/obj_args', { x: 1 }, { Prefer: 'params=single-object, return=minimal' }), w('POST', '/rpc/obj_args', { j: { x: 1 } }, { Prefer: 'params=multiple-objects' }),
    w('POST', '/rpc/obj_args', { j: { x: 1 } }), w('POST', '/rpc/obj_args', { x: null }, { ...SINGLE, ...STRIPPED }),
    w('POST', '/rpc/greet', { name: 'post' }, { Accept: 'text/plain' }), w('POST', '/rpc/bytes_of', { t: 'x' }, { Accept: 'application/octet-stream' }),
    w('POST', '/clients', [{ id: 9, name: 'Nine' }, { id: 10, name: 'Ten', city: 'X' }], { ...STRIPPED, Prefer: 'return=representation' }),
    w('PATCH', '/clients?id=eq.2', { name: 'G' }, { Accept: 'application/vnd.pgrst.object+json;nulls=stripped', Prefer: 'return=representation' }),
    w('POST', '/clients', { id: 9, name: 'Nine', city: 'Oslo' }, { ...TSV, Prefer: 'return=representation' }), w('DELETE', '/clients?id=eq.9', undefined, TSV),
    w('PATCH', '/clients?id=lt.3&order=id', { city: 'Z' }, { ...TSV, Prefer: 'return=representation' }),
    // a form body: one object of strings
    w('POST', '/rpc/add', 'a=1&b=2', { 'Content-Type': 'application/x-www-form-urlencoded' }),
    w('POST', '/rpc/obj_args', 'a=1&b=x+y&c=%C3%A9', { ...SINGLE, 'Content-Type': 'application/x-www-form-urlencoded' }),
    w('POST', '/rpc/obj_product', { x: 1, y: 4 }, { Prefer: 'params=single-object,count=exact' }),
    w('POST', '/clients', 'id=9&name=Nine+N&city=%C3%85s', { 'Content-Type': 'application/x-www-form-urlencoded', Prefer: 'return=representation' }),
    w('POST', '/projects?select=id,owner(name),open_tasks(title)', { id: 8, name: 'New', client_id: 3 }, { Prefer: 'return=representation' }),
    w('PATCH', '/projects?id=eq.1&select=name,big:owner(name),open_tasks(count)', { name: 'R2' }, { Prefer: 'return=representation' }),
    w('POST', '/rpc/add', 'hi', { 'Content-Type': 'text/xml' }), w('POST', '/rpc/shout', 'hi', { 'Content-Type': 'text/plain', Accept: 'application/vnd.pgrst.object+json' }),
    // writes through views: keys inferred from the base tables (upserts, Location, PUT), embedding in the representation
    ...[undefined, 'return=minimal', 'return=representation', 'return=headers-only'].flatMap((ret) => {
      const prefer: Record<string, string> = ret ? { Prefer: ret } : {};
      return [
        w('POST', '/client_list', { id: 9, name: 'Nine' }, prefer), w('POST', '/task_items', { project: 2, label: 'new' }, prefer),
        w('PATCH', '/task_items?task_id=eq.2', { label: 'B' }, prefer), w('DELETE', '/task_items?done=is.true', undefined, prefer),
      ];
    }),
    w('POST', '/client_list', { id: 1, name: 'Merged' }, { Prefer: 'resolution=merge-duplicates,return=representation' }),
    w('POST', '/client_list', [{ id: 1, name: 'M' }, { id: 20, name: 'N' }], { Prefer: 'resolution=merge-duplicates' }),
    w('POST', '/client_list', { id: 1, name: 'Ignored' }, { Prefer: 'resolution=ignore-duplicates,return=representation' }),
    w('POST', '/client_list', { id: 1, name: 'Dup' }),
    w('POST', '/task_items?on_conflict=task_id', { task_id: 1, project: 1, label: 'again' }, { Prefer: 'resolution=merge-duplicates,return=representation' }),
    w('POST', '/task_items', [{ task_id: 2, project: 1, label: 'b' }, { task_id: 40, project: 3, label: 'c' }], { Prefer: 'resolution=merge-duplicates,return=representation' }),
    w('POST', '/open_task_items', { task_id: 3, project: 1, label: 'L' }, { Prefer: 'resolution=merge-duplicates,return=representation' }),
    w('POST', '/task_items?select=label,projects(name)', { project: 2, label: 'new' }, { Prefer: 'return=representation' }),
    w('POST', '/open_task_items?select=task_id,label,project_clients(name)', { project: 3, label: 'x' }, { Prefer: 'return=representation' }),
    // (one row: with a to-one embed, the order of several written rows is unspecified and may differ, docs/rest.md)
    w('PATCH', '/task_items?project=eq.1&select=task_id,label', { done: true }, { Prefer: 'return=representation' }),
    w('PATCH', '/task_items?task_id=eq.2&select=task_id,label,projects(name)', { done: true }, { Prefer: 'return=representation' }),
    w('PATCH', '/client_list?id=eq.1', { name: 'A2' }, { Prefer: 'return=representation', ...OBJECT }),
    w('PATCH', '/client_list?id=gt.1', { name: 'many' }, { Prefer: 'return=representation', ...OBJECT }),
    w('PATCH', '/open_task_items?task_id=eq.2', { label: 'b2' }, { Prefer: 'return=representation' }),
    w('DELETE', '/open_task_items?project=eq.1', undefined, { Prefer: 'return=representation' }),
    w('DELETE', '/client_list?id=eq.2', undefined, { Prefer: 'return=representation', ...OBJECT }),
    w('DELETE', '/client_list?id=eq.1', undefined),
    w('PUT', '/client_list?id=eq.1', { id: 1, name: 'Put' }), w('PUT', '/client_list?id=eq.50', { id: 50, name: 'New' }, { Prefer: 'return=representation' }),
    w('PUT', '/task_items?task_id=eq.1', { task_id: 1, project: 1, label: 'put', done: false }, { Prefer: 'return=representation' }),
    w('PUT', '/client_list?name=eq.Acme', { id: 1, name: 'Acme' }),
    w('PATCH', '/project_clients?id=eq.1', { name: 'x' }), w('POST', '/project_clients', { id: 9, name: 'x' }),
  );
  return out;
}
