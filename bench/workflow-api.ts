/** What the materializer's benchmarks share: its REST API, waiting for a condition, timing a step. */

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A caller of the materializer's REST API on `port`: the JSON answer, or an error naming the request and status. */
export function materializerApi(port: number): (method: string, route: string, body?: unknown) => Promise<any> {
  return async (method, route, body) => {
    const res = await fetch(`http://127.0.0.1:${port}${route}`, {
      method, headers: body ? { 'content-type': 'application/json' } : {}, body: body ? JSON.stringify(body) : undefined,
    });
    const json = await res.json();
    if (res.status >= 300) throw new Error(`${method} ${route}: ${res.status} ${JSON.stringify(json)}`);
    return json;
  };
}

/** `fn`'s first truthy answer, polled every 100 ms (errors count as not yet) for up to `ms`. */
export async function until<T>(what: string, ms: number, fn: () => Promise<T | undefined | false>): Promise<T> {
  for (const deadline = Date.now() + ms; Date.now() < deadline; await sleep(100)) {
    const v = await fn().catch(() => undefined);
    if (v) return v;
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** Seconds `fn` takes. */
export async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return (performance.now() - t0) / 1000;
}
