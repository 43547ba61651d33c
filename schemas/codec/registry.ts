/** A minimal client of the Confluent schema-registry REST API (the parts the codec needs). */
export class RegistryError extends Error {
  constructor(message: string, readonly status: number, readonly errorCode?: number) {
    super(message);
  }
}

export class SchemaRegistryClient {
  private byId = new Map<number, Promise<string>>();

  constructor(readonly url: string) {}

  /** Registers (or finds) a schema under a subject; the registry checks compatibility. */
  async register(subject: string, schema: string): Promise<number> {
    const body = await this.call('POST', `/subjects/${encodeURIComponent(subject)}/versions`, { schema });
    return body.id;
  }

  /** The schema text of an id; ids are immutable, so the answer is cached. */
  schemaById(id: number): Promise<string> {
    let s = this.byId.get(id);
    if (!s) {
      s = this.call('GET', `/schemas/ids/${id}`).then((b) => b.schema as string);
      s.catch(() => this.byId.delete(id));
      this.byId.set(id, s);
    }
    return s;
  }

  async setCompatibility(subject: string | null, level: string): Promise<void> {
    await this.call('PUT', subject ? `/config/${encodeURIComponent(subject)}` : '/config', { compatibility: level });
  }

  private async call(method: string, path: string, body?: unknown): Promise<any> {
    const res = await fetch(this.url + path, {
      method,
      headers: { 'content-type': 'application/vnd.schemaregistry.v1+json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const json: any = await res.json().catch(() => ({}));
    if (!res.ok) throw new RegistryError(`schema registry ${method} ${path}: ${res.status} ${json.message ?? ''}`.trim(), res.status, json.error_code);
    return json;
  }
}
